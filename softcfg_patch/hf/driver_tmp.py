"""SoftCFG for Hugging Face `transformers` decoders (optional extra: transformers >= 5.22).

Any decoder that generates image tokens through a KV cache gets SoftCFG from two
pieces, without touching its modeling code:

* `SoftCFGCache` / `SoftCFGStaticCache`: drop-in `DynamicCache` / `StaticCache`
  subclasses. They store K/V unscaled and return from `update()` the values (target
  "v"), keys ("k") or both ("kv") multiplied by a per-(row, position) multiplier
  table. The table is all ones except where `set_multipliers` wrote the
  unconditional rows, so conditional rows and prompt positions come back bit for bit.
* `SoftCFGSampler`: one guided step per call, the stages of `softcfg_patch.step`
  (mix, temperature, top-k/top-p, sampling, conditional confidence, next step's
  multipliers) in the same order as the ImageNet sampler; nothing here re-derives them.

Two drivers use them: `generate()` (a batched [cond; uncond] loop for causal LMs
whose image tokens are ordinary vocabulary entries) and `SoftCFGLogitsProcessor`
(plugs into stock `model.generate`, including Janus image mode: softcfg_patch.hf_janus,
re-exported here as `janus_generate_images` / `janus_softcfg`). Pipelines that do CFG
the unbatched way (Emu3-Gen, Chameleon/Anole, Lumina-mGPT) swap transformers'
`UnbatchedClassifierFreeGuidanceLogitsProcessor` for `SoftCFGUnbatchedLogitsProcessor`
(softcfg_patch.hf_unbatched, re-exported here).

Example, SoftCFG for your own model::

    import torch
    from transformers import AutoModelForCausalLM
    from softcfg_patch import Guidance
    from softcfg_patch.hf import generate

    model = AutoModelForCausalLM.from_pretrained("path/to/your-image-lm").eval()
    cond = torch.tensor([[1, 523, 88, 9001]])     # prompt ids ending in <begin-of-image>
    uncond = torch.tensor([[1, 9001]])            # shorter prompts are left-padded for you
    guidance = Guidance(guidance_scale=5.0, guidance_scale_pow=0.0,
                        softcfg_strength=1.0, step_norm=True)
    tokens = generate(model, cond, uncond, guidance, max_new_tokens=1024,
                      generator=torch.Generator().manual_seed(0),
                      structural_token_ids=[9002],   # e.g. end-of-line: weight 1, not normalised
                      cache_implementation="static") # or "dynamic"
    # tokens: LongTensor [1, 1024]; feed them to your VQ decoder.

With stock `model.generate` instead: build the batch with `cfg_batch`, pass
`cache=SoftCFGCache(...)` and `logits_processor=[SoftCFGLogitsProcessor(...)]`
with `do_sample=False`; the processor samples and forces its token on both rows.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers import DynamicCache, LogitsProcessor, StaticCache
    from transformers.cache_utils import StaticLayer
except ImportError as exc:  # the base install does not include transformers
    raise ImportError("softcfg_patch.hf needs the optional extra: pip install 'softcfg[hf]' "
                      "(transformers>=5.22)") from exc

from .cache import MultiplierTable
from .guidance import Guidance
from .step import (Schedule, StepHook, filter_logits, mix, position_weights, record_confidence,
                   sample, temperature)
from .versions import version_tuple

MIN_TRANSFORMERS = (5, 22)
if version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(f"softcfg_patch.hf needs transformers>=5.22, found "
                      f"{transformers.__version__}")

Rows = Union[torch.Tensor, Sequence[int]]

__all__ = [
    "SoftCFGCache", "SoftCFGStaticCache", "SoftCFGSampler", "SoftCFGLogitsProcessor",
    "generated_position_weights", "cfg_batch", "make_cache", "cache_argument", "generate",
    "janus_softcfg", "janus_generate_images", "SoftCFGUnbatchedLogitsProcessor",
]

# constraint(tokens so far [B, t], guided logits [B, V]) -> guided logits: e.g. a prefix
# constraint, applied after the mix and before temperature / top-k / top-p.
Constraint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- caches

class _MultiplierTableMixin:
    """Applies the one SoftCFG `MultiplierTable` (softcfg_patch.cache) in `update()`.

    The table is written in place (`set_multipliers`) so a compiled forward that reads
    it sees new values without recompiling; the stored K/V are never modified, so
    multipliers cannot compound across steps.
    """

    def _init_softcfg(self, target: str, enabled: bool) -> None:
        MultiplierTable(0, 0, target)  # validates the target before anything is allocated
        self.softcfg_target = target
        self.softcfg_enabled = bool(enabled)
        self.multipliers: Optional[MultiplierTable] = None

    @property
    def multiplier_table(self) -> Optional[torch.Tensor]:
        return None if self.multipliers is None else self.multipliers.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self.softcfg_enabled:
            return keys, values
        table = self._table(keys.shape[0], keys.shape[-2], keys.device)
        weights = table.values[:, None, : keys.shape[-2], None]  # broadcast over heads, head_dim
        if table.scale_k:
            keys = (keys * weights).to(keys.dtype)  # product in float32, one rounding
        if table.scale_v:
            values = (values * weights).to(values.dtype)
        return keys, values

    def set_multipliers(self, rows: Rows, start: int, values: torch.Tensor) -> None:
        """Write multipliers of positions [start, start + values.shape[1]) for `rows`, in place."""
        if self.multipliers is None:
            raise RuntimeError("set_multipliers before the first forward: run the prompt through "
                               "the model with this cache first")
        table = self._table(self.multipliers.values.shape[0], start + values.shape[1],
                            self.multipliers.values.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=table.values.device)
        table.write(rows, start, values.to(table.values.device))

    def reset_multipliers(self) -> None:
        if self.multipliers is not None:
            self.multipliers.reset()

    def reset(self) -> None:
        super().reset()
        self.reset_multipliers()

    def _table(self, rows: int, length: int, device: torch.device) -> MultiplierTable:
        table = self.multipliers
        if table is None:
            table = MultiplierTable(rows, self._initial_capacity(length), self.softcfg_target, device)
            if not torch.compiler.is_compiling():
                # a fixed address lets compiled graphs / cuda graphs read the live table
                torch._dynamo.mark_static_address(table.values)
        elif table.values.shape[1] < length:
            if not self._growable:  # a static table keeps its address for compiled graphs
                raise RuntimeError(f"position {length - 1} is past the static cache "
                                   f"({table.values.shape[1]} positions)")
            table.grow(length)  # dynamic cache: grow, keeping the written values
        if table.values.shape[0] != rows:
            raise RuntimeError(f"cache batch changed from {table.values.shape[0]} to {rows} rows")
        self.multipliers = table
        return table

    _growable = True

    def _initial_capacity(self, length: int) -> int:
        return max(length, 256)


class SoftCFGCache(_MultiplierTableMixin, DynamicCache):
    """`DynamicCache` whose `update()` returns K/V scaled by the SoftCFG multiplier table.

    Every layer is a full-attention `DynamicLayer` (no config is read), so absolute
    positions index the table directly. `target`: "v" (default), "k" or "kv".
    `enabled=False` makes it behave exactly like `DynamicCache` (plain CFG).
    """

    def __init__(self, target: str = "v", enabled: bool = True) -> None:
        super().__init__()
        self._init_softcfg(target, enabled)


class SoftCFGStaticCache(_MultiplierTableMixin, StaticCache):
    """`StaticCache` (torch.compile friendly) with the same scaling as `SoftCFGCache`.

    The table has `max_cache_len` columns from the first forward on and is only ever
    written in place, so compiled decode steps do not recompile when multipliers change.
    Only full-attention layers are supported (sliding-window or linear-attention layers
    would need their own position bookkeeping); use `SoftCFGCache` for such models.
    """

    def __init__(self, config, max_cache_len: int, target: str = "v", enabled: bool = True,
                 **kwargs) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        unsupported = sorted({type(layer).__name__ for layer in self.layers
                              if type(layer) is not StaticLayer})
        if unsupported:
            raise NotImplementedError(f"SoftCFGStaticCache supports full-attention layers only; "
                                      f"this config builds {unsupported}. Use SoftCFGCache "
                                      f"instead.")
        self.max_cache_len = max_cache_len
        self._init_softcfg(target, enabled)

    _growable = False

    def _initial_capacity(self, length: int) -> int:
        return self.max_cache_len


# ------------------------------------------------------------------ the per-step logic

def generated_position_weights(history: torch.Tensor, structural: Optional[torch.Tensor],
                               guidance: Guidance) -> torch.Tensor:
    """Multipliers of x_0 .. x_{t-1} for the next forward, [B, t] (softcfg_patch.step.position_weights)."""
    return position_weights(history, guidance, structural)


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
                 uncond_rows: Optional[Rows] = None, cache: Optional[_MultiplierTableMixin] = None,
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
        elif guidance.uses_cfg:
            raise ValueError("guidance_scale != 0 needs unconditional rows")
        if guidance.uses_softcfg and cache is None:
            raise ValueError("softcfg_strength > 0 needs a SoftCFGCache or SoftCFGStaticCache")
        if cache is not None and guidance.uses_softcfg and not cache.softcfg_enabled:
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
        uncond = logits[self.uncond_rows] if g.uses_cfg else None
        mixed = mix(cond, uncond, t, self.schedule)
        if self.constraint is not None:
            mixed = self.constraint(self.tokens[:, :t], mixed)
        guided = filter_logits(temperature(mixed, g), g.top_k, g.top_p)
        token = sample(guided, self.generator)
        self.tokens[:, t] = token
        self.step = t + 1
        if g.uses_softcfg:
            record_confidence(self.confidences, t, cond, token, g)
            if self.structural_ids.numel():  # else no isin and no host sync per step
                self.structural[:, t] = torch.isin(token, self.structural_ids)
        if self.on_step is not None:
            self.on_step(t, cond, uncond, guided, token, self.cache)
        if g.uses_softcfg:
            structural = self.structural[:, :t + 1] if self.structural_ids.numel() else None
            weights = position_weights(self.confidences[:, :t + 1], g, structural)
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
                 uncond_rows: Optional[Rows] = None, cache: Optional[_MultiplierTableMixin] = None,
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


# --------------------------------------------------------------- the batched loop

def cfg_batch(cond_ids: torch.Tensor, uncond_ids: torch.Tensor,
              cond_attention_mask: Optional[torch.Tensor] = None,
              uncond_attention_mask: Optional[torch.Tensor] = None,
              pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [cond; uncond] prompts into one left-padded batch of 2B rows.

    Returns (input_ids [2B, L], attention_mask [2B, L]); uncond may have 1 row (shared
    by all samples). Left padding keeps every row's last real token at the end, so
    all rows append generated tokens at the same cache positions.
    """
    cond_ids, uncond_ids = torch.atleast_2d(cond_ids), torch.atleast_2d(uncond_ids)
    batch = cond_ids.shape[0]
    if uncond_ids.shape[0] == 1 and batch > 1:
        uncond_ids = uncond_ids.expand(batch, -1)
        if uncond_attention_mask is not None:
            uncond_attention_mask = torch.atleast_2d(uncond_attention_mask).expand(batch, -1)
    if uncond_ids.shape[0] != batch:
        raise ValueError(f"uncond_ids has {uncond_ids.shape[0]} rows, expected 1 or {batch}")
    length = max(cond_ids.shape[1], uncond_ids.shape[1])
    parts = [_left_pad(ids, mask, length, pad_token_id) for ids, mask in
             ((cond_ids, cond_attention_mask), (uncond_ids, uncond_attention_mask))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _left_pad(ids: torch.Tensor, mask: Optional[torch.Tensor], length: int,
              pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids) if mask is None else torch.atleast_2d(mask).to(ids.device).long()
    pad = length - ids.shape[1]
    return F.pad(ids, (pad, 0), value=pad_token_id), F.pad(mask, (pad, 0), value=0)


def make_cache(model: torch.nn.Module, guidance: Guidance, cache_implementation: str = "dynamic",
               max_cache_len: Optional[int] = None) -> _MultiplierTableMixin:
    """A SoftCFG cache for `model`; scaling is switched off unless SoftCFG is on."""
    kwargs = dict(target=guidance.softcfg_target, enabled=guidance.uses_softcfg)
    if cache_implementation == "dynamic":
        return SoftCFGCache(**kwargs)
    if cache_implementation == "static":
        if max_cache_len is None:
            raise ValueError("a static cache needs max_cache_len")
        return SoftCFGStaticCache(model.config, max_cache_len, **kwargs)
    raise ValueError(f"cache_implementation must be 'dynamic' or 'static', "
                     f"got {cache_implementation!r}")


def cache_argument(model: torch.nn.Module) -> str:
    """The forward/generate keyword of the cache: 'cache' (newer) or 'past_key_values' (5.22)."""
    return _forward_keywords(type(model))[0]


@functools.lru_cache(maxsize=None)
def _forward_keywords(model_class: type) -> tuple[str, bool]:
    """(cache keyword, takes logits_to_keep) of a model class's forward: read once per class,
    not at every decode step."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values", "logits_to_keep" in parameters


@torch.no_grad()
def generate(model: torch.nn.Module, cond_ids: torch.Tensor, uncond_ids: Optional[torch.Tensor],
             guidance: Guidance, max_new_tokens: int, generator: Optional[torch.Generator] = None,
             structural_token_ids: Iterable[int] = (),
             cond_attention_mask: Optional[torch.Tensor] = None,
             uncond_attention_mask: Optional[torch.Tensor] = None,
             cache_implementation: str = "dynamic",
             pad_token_id: Optional[int] = None,
             on_step: Optional[StepHook] = None,
             logits_processor: Optional[Callable] = None) -> torch.Tensor:
    """Sample `max_new_tokens` tokens per prompt with CFG / SoftCFG. Returns LongTensor [B, N].

    For causal LMs whose image tokens are ordinary vocabulary entries. The batch is
    [cond; uncond] (2B rows, left-padded by `cfg_batch`); with guidance_scale 0 only
    the conditional rows run. Sampling is multinomial with `generator` (global RNG if
    None). Tokens in `structural_token_ids` keep weight 1 and stay out of the
    normalisation. `on_step(step, cond, uncond, guided, tokens, cache)` sees every step.
    `logits_processor` (a transformers `LogitsProcessor` or list, e.g. Emu3's
    `PrefixConstrainedLogitsProcessor`) is applied to the guided logits before the
    temperature, called with the conditional prompt (as given) plus the tokens so far,
    as in stock `generate` with a CFG processor first in its list.
    """
    if guidance.uses_cfg and uncond_ids is None:
        raise ValueError(f"uncond_ids is None but guidance_scale is {guidance.guidance_scale}: "
                         f"CFG needs the unconditional prompt ids (e.g. just BOS and "
                         f"<begin-of-image>), or pass Guidance(guidance_scale=0) for no CFG")
    if pad_token_id is None:
        pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    cond_ids = torch.atleast_2d(cond_ids)
    batch = cond_ids.shape[0]
    if guidance.uses_cfg:
        ids, mask = cfg_batch(cond_ids, uncond_ids, cond_attention_mask, uncond_attention_mask,
                              pad_token_id)
        cond_rows, uncond_rows = torch.arange(batch), torch.arange(batch, 2 * batch)
    else:
        ids, mask = _left_pad(cond_ids, cond_attention_mask, cond_ids.shape[1], pad_token_id)
        cond_rows, uncond_rows = torch.arange(batch), None
    prompt_length = ids.shape[1]
    cache = make_cache(model, guidance, cache_implementation, prompt_length + max_new_tokens)
    constraint = None
    if logits_processor is not None:
        def constraint(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            return logits_processor(torch.cat([cond_ids.to(tokens.device), tokens], dim=1), logits)
    sampler = SoftCFGSampler(guidance, max_new_tokens, cond_rows, uncond_rows, cache, generator,
                             structural_token_ids, prompt_length, on_step, constraint)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens start at 0
    # The mask covers every position the loop will write (later ones are hidden by
    # causality), so decode steps keep one input shape: a compiled forward over a
    # static cache does not recompile from step to step.
    mask = F.pad(mask, (0, max_new_tokens), value=1)
    logits = _forward(model, ids, mask[:, :prompt_length], positions, cache)
    for step in range(max_new_tokens):
        token = sampler(logits)
        if step + 1 == max_new_tokens:
            break
        positions = positions[:, -1:] + 1
        step_mask = mask if cache_implementation == "static" else mask[:, :prompt_length + step + 1]
        logits = _forward(model, sampler.row_tokens(token, ids.shape[0])[:, None], step_mask,
                          positions, cache)
    return sampler.tokens


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor, cache) -> torch.Tensor:
    cache_keyword, takes_logits_to_keep = _forward_keywords(type(model))
    kwargs = {cache_keyword: cache, "use_cache": True}
    if takes_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    return out.logits[:, -1]


# Janus glue lives in hf_janus.py; kept importable from here.
from .hf_janus import janus_generate_images, janus_softcfg  # noqa: E402
from .hf_unbatched import SoftCFGUnbatchedLogitsProcessor  # noqa: E402
