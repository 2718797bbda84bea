"""One guided decode step per call for a batch of explicit (cond, uncond) row pairs:
`SoftCFGSampler`, and `SoftCFGLogitsProcessor`, which plugs it into stock `model.generate`.

The stages are softcfg_patch.step's (mix, temperature, top-k/top-p, sampling, conditional
confidence, next multipliers) in the ImageNet sampler's order; nothing here re-derives them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from transformers import LogitsProcessor

from ..guidance import Guidance, runs_cfg, runs_softcfg
from ..step import (Schedule, StepHook, filter_logits, mix, next_multipliers, record_confidence, sample,
                    temperature)
from .cache import MultiplierCache, Rows

__all__ = ["SoftCFGSampler", "SoftCFGLogitsProcessor", "Constraint"]

# constraint(tokens so far [B, t], guided logits [B, V]) -> guided logits: e.g. a prefix
# constraint, applied after the mix and before temperature / top-k / top-p.
Constraint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SoftCFGSampler:
    """One guided decode step at a time, for a batch whose rows pair up explicitly.

    `cond_rows[i]` and `uncond_rows[i]` are the two branches of sample i, in whatever
    layout the model uses ([cond; uncond] stacked, interleaved, ...). Call it with the
    last-position logits of all rows; it returns the B sampled tokens and, with SoftCFG
    on, has already written the multipliers for the next forward into `cache`. The
    stages and their order are softcfg_patch.step's, as in the ImageNet sampler;
    `on_step(step, cond, uncond, guided, tokens, cache)` is the hook of every driver;
    `constraint(tokens, guided)` (optional) restricts the guided logits before the
    temperature, as a `generate` logits processor after a CFG processor would.
    """

    def __init__(self, guidance: Guidance, num_steps: int, cond_rows: Rows,
                 uncond_rows: Optional[Rows] = None, cache: Optional[MultiplierCache] = None,
                 generator: Optional[torch.Generator] = None,
                 structural_token_ids: Iterable[int] = (),
                 prompt_length: Optional[int] = None, on_step: Optional[StepHook] = None,
                 constraint: Optional[Constraint] = None) -> None:
        self.guidance = guidance
        self.constraint = constraint
        self.num_steps = int(num_steps)
        self.cond_rows = torch.as_tensor(cond_rows, dtype=torch.long).flatten()
        # Kept even without guidance: both rows of a pair must still receive the token.
        self.uncond_rows = None
        if uncond_rows is not None:
            self.uncond_rows = torch.as_tensor(uncond_rows, dtype=torch.long).flatten()
            if self.uncond_rows.shape != self.cond_rows.shape:
                raise ValueError("cond_rows and uncond_rows must pair up one to one")
        elif runs_cfg(guidance):
            raise ValueError("guidance_scale != 0 needs unconditional rows")
        self.cfg, self.softcfg = runs_cfg(guidance), runs_softcfg(guidance)  # scale 0 is unguided here
        if self.softcfg and cache is None:
            raise ValueError("softcfg_strength > 0 needs a SoftCFGCache or SoftCFGStaticCache")
        if cache is not None and self.softcfg and not cache.softcfg_enabled:
            raise ValueError("the cache was built with enabled=False but SoftCFG is on")
        self.cache = cache
        self.generator = generator
        self.on_step = on_step
        self.structural_ids = torch.as_tensor(sorted(set(int(i) for i in structural_token_ids)),
                                              dtype=torch.long)
        self.prompt_length = prompt_length
        batch = self.cond_rows.numel()
        self.schedule: Optional[Schedule] = None  # built on the first call's device
        self.tokens = torch.zeros(batch, self.num_steps, dtype=torch.long)
        self.confidences = torch.zeros(batch, self.num_steps)
        self.structural = torch.zeros(batch, self.num_steps, dtype=torch.bool)
        self.step = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, V] of the last position -> sampled tokens [B] (on logits.device).

        `generator` must live on logits.device (multinomial's rule).
        """
        t, g = self.step, self.guidance
        if t >= self.num_steps:
            raise RuntimeError(f"called for step {t} but num_steps is {self.num_steps}")
        self._to(logits.device)
        if t == 0 and self.prompt_length is None and self.cache is not None:
            # the whole prompt is in the cache now
            self.prompt_length = int(self.cache.get_seq_length())
        cond = logits[self.cond_rows]
        uncond = logits[self.uncond_rows] if self.cfg else None
        mixed = mix(cond, uncond, t, self.schedule)
        if self.constraint is not None:
            mixed = self.constraint(self.tokens[:, :t], mixed)
        guided = filter_logits(temperature(mixed, g), g.top_k, g.top_p)
        token = sample(guided, self.generator)
        self.tokens[:, t] = token
        self.step = t + 1
        if self.softcfg:
            record_confidence(self.confidences, t, cond, token, g)
            if self.structural_ids.numel():  # else no isin and no host sync per step
                self.structural[:, t] = torch.isin(token, self.structural_ids)
        if self.on_step is not None:
            self.on_step(t, cond, uncond, guided, token, self.cache)
        if self.softcfg:
            structural = self.structural[:, :t + 1] if self.structural_ids.numel() else None
            weights = next_multipliers(self.confidences[:, :t + 1], g, structural)
            self.cache.set_multipliers(self.uncond_rows, self.prompt_length, weights)
        return token

    def row_tokens(self, token: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Both branches of sample i continue with its token: [num_rows] ids for the next step."""
        out = torch.zeros(num_rows, dtype=token.dtype, device=token.device)
        out[self.cond_rows] = token
        if self.uncond_rows is not None:
            out[self.uncond_rows] = token
        return out

    def _to(self, device: torch.device) -> None:
        if self.schedule is None or self.tokens.device != device:
            for name in ("cond_rows", "uncond_rows", "structural_ids", "tokens", "confidences",
                         "structural"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(device))
            self.schedule = Schedule(self.guidance, self.num_steps, device)


class SoftCFGLogitsProcessor(LogitsProcessor):
    """Plugs SoftCFG into stock `model.generate(...)` (Llama-like LMs, Janus image mode).

    It sees the raw logits of every row, does the guidance, sampling and SoftCFG
    bookkeeping with `SoftCFGSampler` (so the conditional confidence is recorded
    before any CFG processor of the model runs, and the multipliers are in the cache
    before the next forward), then returns scores that force the sampled token on
    both rows of each pair. Whatever the model does next with a (cond, uncond) pair
    of identical rows (Janus's ClassifierFreeGuidanceLogitsProcessor at any scale,
    argmax, or sampling) picks that token. Use `do_sample=False` so the model's own
    warpers and RNG stay out of the way. The tokens are also in `self.tokens`.
    """

    def __init__(self, guidance: Guidance, max_new_tokens: int, cond_rows: Rows,
                 uncond_rows: Optional[Rows] = None, cache: Optional[MultiplierCache] = None,
                 generator: Optional[torch.Generator] = None,
                 structural_token_ids: Iterable[int] = (),
                 on_step: Optional[StepHook] = None) -> None:
        self.sampler = SoftCFGSampler(guidance, max_new_tokens, cond_rows, uncond_rows, cache,
                                      generator, structural_token_ids, on_step=on_step)

    @property
    def tokens(self) -> torch.Tensor:
        return self.sampler.tokens[:, : self.sampler.step]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.sampler(scores)
        rows = self.sampler.row_tokens(token, scores.shape[0])
        # finite fill: a CFG processor computing uncond + s * (cond - uncond) on two
        # identical rows must not see -inf - -inf
        forced = torch.full_like(scores, torch.finfo(scores.dtype).min / 2)
        forced.scatter_(1, rows[:, None], 0.0)
        return forced
