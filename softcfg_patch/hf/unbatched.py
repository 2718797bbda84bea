"""SoftCFG for pipelines that do CFG the *unbatched* way (Emu3-Gen, Chameleon/Anole, Lumina-mGPT).

Such pipelines pass transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` to
stock `model.generate`: the processor runs the unconditional prompt through the model
itself, with its own KV cache, and mixes its logits into the conditional scores.
`SoftCFGUnbatchedLogitsProcessor` has the same constructor shape and behaviour; its
unconditional cache is a `SoftCFGCache`, so changing the class name gives SoftCFG.

At call t (the call that scores x_t) it
  1. records the confidence of x_{t-1} (the last input id) under softmax(s / T) of the
     conditional scores s it received at call t - 1, T = guidance.randomize_temperature;
  2. writes the next multipliers of the unconditional generated positions with the one
     rule (softcfg_patch.step.next_multipliers; prompt positions keep weight 1);
  3. runs the unconditional forward of x_{t-1} through its SoftCFG cache;
  4. returns step.mix(log_softmax(s), log_softmax(z_u)) = the guided scores in
     transformers' log-softmax form, *before* temperature: `generate` divides by T,
     applies top-k / top-p and samples after it.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
import transformers
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    TemperatureLogitsWarper, UnbatchedClassifierFreeGuidanceLogitsProcessor,
)

from ..guidance import Guidance, runs_cfg, runs_softcfg
from ..step import Schedule, StepHook, mix, next_multipliers, token_confidence
from .cache import SoftCFGCache
from .generate import model_forward

__all__ = ["SoftCFGUnbatchedLogitsProcessor"]


class SoftCFGUnbatchedLogitsProcessor(LogitsProcessor):
    """Drop-in SoftCFG replacement for transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`.

    guidance:          our `Guidance`. `guidance_scale == 1` is "no CFG" here, as in
                       transformers (the unconditional forward is skipped); temperature,
                       top-k and top-p stay `generate`'s job, so `top_k`/`top_p` must keep
                       their defaults and `randomize_temperature` must equal the
                       `temperature` given to `generate` (checked on the first call).
    unconditional_ids: B rows (one per prompt; repeated for `num_return_sequences` like
                       `generate` repeats the prompts), one row (shared by all), or None
                       (each row's last prompt token, as transformers does). Left padding
                       is fine with `unconditional_attention_mask`.
    use_cache:         False recomputes the unconditional prompt every step (plain CFG
                       only: SoftCFG is defined on the cache).
    max_new_tokens:    the N of the schedule; required when guidance_scale_pow != 0.
    structural_token_ids: tokens (e.g. end-of-line) whose positions keep weight 1 and
                       stay out of Step Normalization, as in the batched driver.
    on_step:           on_step(step, cond, uncond, guided, tokens, cache) after the mix of
                       every call; cond / uncond / guided are in the log-softmax form
                       mixed here, tokens is None (`generate` samples after the processor).

    The conditional scores are whatever reaches the processor: put it first in the
    `logits_processor` list (as Emu3's example does) so they are the model's own; a
    `prefix_allowed_tokens_fn` given to `generate` runs before it, and the confidence
    then comes from that constrained distribution. Do not also pass `guidance_scale`
    to `generate` (a second CFG); beam search is not supported.
    """

    def __init__(self, guidance: Guidance, model: torch.nn.Module,
                 unconditional_ids: Optional[torch.LongTensor] = None,
                 unconditional_attention_mask: Optional[torch.LongTensor] = None,
                 use_cache: bool = True, max_new_tokens: Optional[int] = None,
                 structural_token_ids: Optional[Iterable[int]] = None,
                 on_step: Optional[StepHook] = None) -> None:
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be softcfg_patch.Guidance, got {type(guidance).__name__}")
        if guidance.top_k != 0 or guidance.top_p != 1.0:
            raise ValueError(f"Guidance(top_k={guidance.top_k}, top_p={guidance.top_p}): with the "
                             f"unbatched processor top-k/top-p are generate's job; keep Guidance's "
                             f"defaults (top_k=0, top_p=1.0) and pass top_k/top_p to model.generate")
        if guidance.guidance_scale_pow != 0 and max_new_tokens is None:
            raise ValueError(f"guidance_scale_pow={guidance.guidance_scale_pow} schedules the scale "
                             f"over the generated tokens: pass max_new_tokens (the same N as to "
                             f"model.generate), or use guidance_scale_pow=0 for a constant scale")
        self.guidance = guidance
        self.model = model
        self.cfg = runs_cfg(guidance, self)
        self.softcfg = runs_softcfg(guidance, self)
        if self.softcfg and not use_cache:
            raise ValueError("use_cache=False with softcfg_strength > 0: SoftCFG scales the "
                             "unconditional KV cache, so it needs use_cache=True")
        self.max_new_tokens = max_new_tokens
        self._num_steps = max_new_tokens or 1  # the schedule is built on the scores' device
        self.schedule: Optional[Schedule] = None
        self.unconditional_ids = unconditional_ids
        self.unconditional_attention_mask = unconditional_attention_mask
        self.use_cache = use_cache
        self.cache = SoftCFGCache(guidance.softcfg_target, enabled=self.softcfg) if use_cache else None
        self.structural_ids = torch.as_tensor(sorted(set(int(i) for i in structural_token_ids or ())),
                                              dtype=torch.long)
        self.on_step = on_step
        self.step = 0
        # c_0 .. c_{t-1} and their structural flags, [rows, capacity], written in place (no
        # per-step re-stacking of the whole history); allocated on the first record
        self._history: Optional[torch.Tensor] = None
        self._structural: Optional[torch.Tensor] = None
        self._recorded = 0
        self._last_scores: Optional[torch.Tensor] = None

    unguided_at = "1"  # transformers' rule for this processor: scale 1 is no guidance (0 is not)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = self.step
        if t == 0:
            _check_generate_settings(self, input_ids.shape[0])
            self._cond_length = input_ids.shape[1]
            self.schedule = Schedule(self.guidance, self._num_steps, scores.device)
            self.structural_ids = self.structural_ids.to(scores.device)
            self._rows = torch.arange(input_ids.shape[0], device=scores.device)
        elif input_ids.shape[1] != self._cond_length + t:
            raise RuntimeError("a SoftCFGUnbatchedLogitsProcessor serves one generate call (it holds "
                               "that call's unconditional cache); build a new one for each call")
        elif self.max_new_tokens is not None and t >= self.max_new_tokens:
            raise RuntimeError(f"called for token {t + 1} but max_new_tokens={self.max_new_tokens}: "
                               f"pass the same max_new_tokens to the processor and to generate")
        cond = F.log_softmax(scores, dim=-1)
        uncond = None
        if self.cfg:
            if t > 0 and self.softcfg:
                self._set_multipliers(input_ids[:, -1])
            uncond = F.log_softmax(self._unconditional_logits(input_ids), dim=-1)
            if self.softcfg:
                self._last_scores = scores
        guided = mix(cond, uncond, t, self._schedule(t))
        if self.on_step is not None:
            self.on_step(t, cond, uncond, guided, None, self.cache)
        self.step = t + 1
        return guided

    # ----------------------------------------------------------------- SoftCFG

    @property
    def confidences(self) -> torch.Tensor:
        """c_0 .. c_{t-1} recorded so far, [rows, t] (a view of the history)."""
        return self._history[:, :self._recorded] if self._history is not None else torch.zeros(0, 0)

    def _set_multipliers(self, previous_token: torch.Tensor) -> None:
        """Record c_{t-1} of x_{t-1} and write the multipliers of x_0 .. x_{t-1} for this forward."""
        g = self.guidance
        markers = self.structural_ids.numel() > 0  # else no isin and no host sync per step
        self._record(token_confidence(self._last_scores, previous_token, g.randomize_temperature,
                                      g.softcfg_confidence),
                     torch.isin(previous_token, self.structural_ids) if markers else None)
        t = self._recorded
        weights = next_multipliers(self._history[:, :t], g, self._structural[:, :t] if markers else None)
        self.cache.set_multipliers(self._rows, self._prompt_length, weights)

    def _record(self, confidence: torch.Tensor, structural: Optional[torch.Tensor]) -> None:
        """Write the next column of the history (and of the structural flags, when there are
        marker ids); N columns when max_new_tokens is known, else doubling."""
        t = self._recorded
        if self._history is None or t == self._history.shape[1]:
            capacity = max(self.max_new_tokens or 0, 2 * (t + 1))
            history = confidence.new_zeros(confidence.shape[0], capacity)
            flags = torch.zeros(history.shape, dtype=torch.bool, device=history.device)
            if self._history is not None:
                history[:, :t], flags[:, :t] = self._history, self._structural
            self._history, self._structural = history, flags
        self._history[:, t] = confidence
        if structural is not None:
            self._structural[:, t] = structural
        self._recorded = t + 1

    def _schedule(self, t: int) -> Schedule:
        if t >= self.schedule.scales.numel():  # constant scale, no N given: extend (same values)
            self.schedule = Schedule(self.guidance, 2 * (t + 1), self.schedule.scales.device)
        return self.schedule

    # ------------------------------------------------------- unconditional branch

    def _unconditional_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Last-position logits of the unconditional rows after appending x_{t-1} (first call: the prompt)."""
        if self.step == 0:
            ids, mask = self._unconditional_prompt(input_ids)
            self._mask, self._ids = mask, ids
            self._positions = (mask.cumsum(-1) - 1).clamp_min(0)
            self._prompt_length = ids.shape[1]
        else:
            new = input_ids[:, -1:]
            self._mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)
            # with a cache only the newest position is ever read (no O(t) concatenation per step)
            next_position = self._positions[:, -1:] + 1
            self._positions = next_position if self.use_cache else torch.cat([self._positions, next_position], dim=1)
            # with a cache only x_{t-1} goes in; without, the whole sequence again
            self._ids = new if self.use_cache else torch.cat([self._ids, new], dim=1)
        if self.use_cache:
            return model_forward(self.model, self._ids, self._mask, self._positions[:, -self._ids.shape[1]:],
                                 self.cache)
        out = self.model(input_ids=self._ids, attention_mask=self._mask,
                         position_ids=self._positions, use_cache=False)
        return out.logits[:, -1]

    def _unconditional_prompt(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional prompt rows matched to the `rows` conditional rows of `generate`."""
        rows = input_ids.shape[0]
        ids = self.unconditional_ids
        if ids is None:
            ids = input_ids[:, -1:]
        ids = torch.atleast_2d(ids).to(input_ids.device)
        mask = self.unconditional_attention_mask
        mask = torch.ones_like(ids) if mask is None else torch.atleast_2d(mask).to(ids.device).long()
        if mask.shape != ids.shape:
            raise ValueError(f"unconditional_attention_mask has shape {tuple(mask.shape)} but "
                             f"unconditional_ids has {tuple(ids.shape)}; they must match")
        if ids.shape[0] != rows:
            if rows % ids.shape[0]:
                raise ValueError(f"unconditional_ids has {ids.shape[0]} rows but generate runs "
                                 f"{rows}; pass 1 row, one per prompt, or one per generated row")
            copies = rows // ids.shape[0]  # generate repeat-interleaves for num_return_sequences
            ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
        return ids, mask


def _check_generate_settings(processor: SoftCFGUnbatchedLogitsProcessor, rows: int) -> None:
    """On the first call, read `generate`'s settings from its frame and reject mismatches.

    A logits processor is not told how `generate` samples, but `generate`'s sampling loop
    holds its `generation_config` and processor list as locals, a few frames up. When they
    cannot be found (called outside `generate`, or a transformers version renamed them) the
    checks are skipped with a warning, so a rename never silently switches them off.
    """
    config, processors = _generate_locals()
    if config is None:
        warnings.warn(f"SoftCFGUnbatchedLogitsProcessor found no generation_config of model.generate on the "
                      f"call stack (called outside generate, or transformers {transformers.__version__} renamed "
                      f"generate's locals): the checks of temperature, max_new_tokens, beams and a second CFG "
                      f"are skipped", RuntimeWarning, stacklevel=3)
        return
    g = processor.guidance
    others = [p for p in processors or () if isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor)]
    if (config.guidance_scale is not None and config.guidance_scale != 1) or others:
        raise ValueError("generate also runs transformers' CFG (guidance_scale was passed to "
                         "generate): remove guidance_scale/negative_prompt_ids from the generate "
                         "call; SoftCFGUnbatchedLogitsProcessor already does the guidance")
    if (config.num_beams or 1) > 1:
        raise ValueError(f"num_beams={config.num_beams}: beam search reorders rows, which the "
                         f"per-row SoftCFG state cannot follow; use sampling or greedy (num_beams=1)")
    if config.do_sample:
        temperature = math.prod(p.temperature for p in processors or ()
                                if isinstance(p, TemperatureLogitsWarper))
        if not math.isclose(temperature, g.randomize_temperature, rel_tol=1e-6):
            raise ValueError(f"Guidance(randomize_temperature={g.randomize_temperature}) but generate "
                             f"samples at temperature {temperature}: the confidence must use the "
                             f"sampling temperature; pass temperature={g.randomize_temperature} to "
                             f"generate (or change randomize_temperature)")
    if (processor.max_new_tokens is not None and config.max_new_tokens is not None
            and config.max_new_tokens != processor.max_new_tokens):
        raise ValueError(f"the processor's max_new_tokens={processor.max_new_tokens} but generate's "
                         f"is {config.max_new_tokens}: the schedule needs the same N; pass the same "
                         f"value to both")
    copies = config.num_return_sequences or 1
    ids = processor.unconditional_ids
    if ids is not None and torch.atleast_2d(ids).shape[0] not in (1, rows // copies, rows):
        raise ValueError(f"unconditional_ids has {torch.atleast_2d(ids).shape[0]} rows; expected 1, "
                         f"one per prompt ({rows // copies}) or one per generated row ({rows})")


def _generate_locals(max_depth: int = 8):
    """(generation_config, logits_processor) of the nearest `generate` sampling frame, or (None, None)."""
    from transformers import GenerationConfig

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back
            if frame is None:
                break
            config = frame.f_locals.get("generation_config")
            if isinstance(config, GenerationConfig):
                return config, frame.f_locals.get("logits_processor")
        return None, None
    finally:
        del frame
