"""Guided autoregressive decoding: generate(), guided_logits(), decode_step().

Written once against a small model protocol, so every model gets CFG and SoftCFG
from the same loop. A model only describes its architecture:

    num_image_tokens      N, tokens generated per image
    vocab_size            V, logits per step
    num_classes           labels must lie in [0, num_classes)
    num_prefix_positions  cache positions before x_0 (AliTok 1: class; RAR 2: cls, class);
                          they are never scaled
    num_layers, num_heads, head_dim    the KV cache layout
    condition_ids(labels) -> LongTensor[B]        embedding ids of the class condition
    none_condition_ids(labels) -> LongTensor[B]   ids of the "none" (unconditional) condition
    prefill(condition_ids, cache) -> [rows, V]    runs the prefix, logits predicting x_0
    decode(tokens, step, cache) -> [rows, V]      feeds x_{step-1}, logits predicting x_step;
                                                  `step` is an int, or a 0-d long tensor on
                                                  the fixed-shape (compiled) path
    optional: unguided_at (which scale means unguided: softcfg_patch.guidance.runs_cfg),
              rng_preamble(num_rows, generator, device) (softcfg_patch.step)

Models route every attention through `causal_attention(q, k, v, cache, layer)`; they
never see guidance. A model that needs per-sequence values at every step (RAR's adaLN
class embedding) keeps them in `cache.state` from prefill() to decode().
The batch is [conditional rows; unconditional rows]; the guided step itself
(mix, temperature, filter, sample, confidence, multipliers) is softcfg_patch.step.
"""
from __future__ import annotations

import types
import weakref
from typing import Optional, Protocol, Union

import torch

from .cache import StaticKVCache
from .guidance import Guidance, runs_cfg, runs_softcfg
from .step import (Schedule, StepHook, guide, next_multipliers, next_multipliers_at, record_confidence,
                   rng_preamble, sample)


class GuidedModel(Protocol):
    num_image_tokens: int
    vocab_size: int
    num_classes: int
    num_prefix_positions: int
    num_layers: int
    num_heads: int
    head_dim: int

    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor: ...
    def none_condition_ids(self, labels: torch.Tensor) -> torch.Tensor: ...
    def prefill(self, condition_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor: ...
    def decode(self, tokens: torch.Tensor, step, cache: StaticKVCache) -> torch.Tensor: ...


class StepState:
    """What a decode step reads besides the model and the cache; built once per batch shape."""

    def __init__(self, guidance: Guidance, batch: int, num_steps: int, prefix: int, cfg: bool,
                 softcfg: bool, device: torch.device) -> None:
        self.guidance, self.batch, self.num_steps, self.prefix = guidance, batch, num_steps, prefix
        self.cfg, self.softcfg = cfg, softcfg
        self.schedule = Schedule(guidance, num_steps, device)
        self.history = torch.zeros(batch, num_steps, dtype=torch.float32, device=device)


def decode_step(model: GuidedModel, cache: StaticKVCache, tokens: torch.Tensor, step,
                state: StepState) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One decode step t >= 1: SoftCFG multipliers from c_0..c_{t-1}, the model forward of
    x_{t-1} (`tokens`, one per row), and the guided softmax input of step t.

    Returns (guided / T filtered [B, V], cond [B, V], uncond [B, V] or None). With `step`
    an int it slices the cache (eager, upstream arithmetic); with a 0-d tensor every
    shape is fixed and nothing syncs with the host, so `torch.compile(fullgraph=True)`
    takes it whole and CUDA graphs can replay it.
    """
    fixed = torch.is_tensor(step)
    if fixed:
        cache.position.copy_(step + (state.prefix - 1))
    if state.softcfg:
        rows = slice(state.batch, 2 * state.batch)
        if fixed:
            cache.multipliers.values[rows, state.prefix:] = next_multipliers_at(state.history, step,
                                                                                state.guidance)
        else:
            cache.multipliers.write(rows, state.prefix,
                                    next_multipliers(state.history[:, :step], state.guidance))
    logits = model.decode(tokens, step, cache)
    return _guide_rows(logits, step, state)


def _guide_rows(logits: torch.Tensor, step, state: StepState):
    B = state.batch
    cond, uncond = (logits[:B], logits[B:]) if state.cfg else (logits, None)
    return guide(cond, uncond, step, state.schedule, state.guidance), cond, uncond


@torch.no_grad()
def generate(model: GuidedModel, labels: torch.Tensor, guidance: Guidance,
             generator: Optional[torch.Generator] = None,
             compile: Union[bool, str] = False) -> torch.Tensor:
    """Sample N image tokens per label with CFG / SoftCFG. Returns LongTensor [B, N].

    With `generator=None` the global RNG is used, exactly like the upstream code.
    `compile=True` runs the fixed-shape decode step through `torch.compile` (inductor,
    fullgraph; CUDA graphs on a GPU), compiled once per model, batch shape and settings
    and reused by later calls; a string picks another backend (e.g. "aot_eager").
    """
    if not compile:
        return decode_loop(model, labels, guidance, generator=generator)[0]
    backend = "inductor" if compile is True else str(compile)
    return decode_loop(model, labels, guidance, generator=generator, fixed_shape=True,
                       compile_backend=backend)[0]


@torch.no_grad()
def guided_logits(model: GuidedModel, labels: torch.Tensor, tokens: torch.Tensor,
                  guidance: Guidance) -> torch.Tensor:
    """Teacher forcing: the exact softmax inputs the sampler uses at each step, [B, N, V].

    The guided logits divided by the temperature (then top-k/top-p filtered), given
    `tokens` as the sampled history; SoftCFG confidences come from these tokens.
    """
    steps = []
    decode_loop(model, labels, guidance, forced_tokens=tokens,
                on_step=lambda t, c, u, guided, x, cache: steps.append(guided.float().clone()))
    return torch.stack(steps, dim=1)


@torch.no_grad()
def decode_loop(model: GuidedModel, labels: torch.Tensor, guidance: Guidance, *,
                generator: Optional[torch.Generator] = None,
                forced_tokens: Optional[torch.Tensor] = None,
                on_step: Optional[StepHook] = None, fixed_shape: bool = False,
                compile_backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode loop behind generate() and guided_logits().

    Returns (tokens [B, N], confidences [B, N]); confidences are zeros unless SoftCFG
    is on. `forced_tokens` replaces sampling (teacher forcing); `on_step(step, cond,
    uncond, guided, tokens, cache)` sees every step (tests and analysis use it).
    `fixed_shape` feeds `decode_step` a 0-d step tensor and a fixed-shape cache, reused
    from call to call for the same model and shapes, with the step compiled by
    `compile_backend` if given (once per workspace).
    """
    labels = _check_labels(model, labels)
    B, N, P = labels.shape[0], model.num_image_tokens, model.num_prefix_positions
    device = labels.device
    if forced_tokens is not None and tuple(forced_tokens.shape) != (B, N):
        raise ValueError(f"tokens must have shape ({B}, {N}), got {tuple(forced_tokens.shape)}")
    cfg = runs_cfg(guidance, model)
    rng_preamble(model, B, generator, device)

    conditions = model.condition_ids(labels)
    if cfg:
        conditions = torch.cat([conditions, model.none_condition_ids(labels)])
    cache, state, step_tensor, step_fn = _workspace(model, guidance, B, conditions.shape[0], cfg,
                                                    device, fixed_shape, compile_backend)
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    logits = model.prefill(conditions, cache)
    cache.advance(P)
    guided, cond, uncond = _guide_rows(logits, 0, state)
    for t in range(N):
        if t > 0:
            previous = tokens[:, t - 1]
            if cfg:
                previous = torch.cat([previous, previous])
            if fixed_shape:
                step_tensor.fill_(t)
                guided, cond, uncond = step_fn(model, cache, previous, step_tensor, state)
            else:
                guided, cond, uncond = step_fn(model, cache, previous, t, state)
                cache.advance(1)
        tokens[:, t] = sample(guided, generator) if forced_tokens is None else forced_tokens[:, t]
        if state.softcfg:
            record_confidence(state.history, t, cond, tokens[:, t], guidance)
        if on_step is not None:
            on_step(t, cond, uncond, guided, tokens[:, t], cache)
    return tokens, state.history.clone()


# Fixed-shape workspaces (cache + step state) per model, reused so a compiled step (and
# CUDA graphs, which need fixed addresses) serves every batch of the same shape.
_WORKSPACES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _workspace(model, guidance: Guidance, batch: int, rows: int, cfg: bool, device: torch.device,
               fixed_shape: bool, compile_backend: Optional[str]):
    dtype = _activation_dtype(model, device)
    key = (guidance, batch, rows, str(device), compile_backend, dtype)
    if fixed_shape and key in _WORKSPACES.get(model, {}):
        workspace = _WORKSPACES[model][key]
        workspace[0].reset()
        workspace[1].history.zero_()
        return workspace
    N, P = model.num_image_tokens, model.num_prefix_positions
    cache = StaticKVCache(model.num_layers, rows, model.num_heads, P + N - 1, model.head_dim,
                          device=device, dtype=dtype)
    softcfg = runs_softcfg(guidance, model)
    if softcfg:
        cache.enable_multipliers(guidance.softcfg_target)
    state = StepState(guidance, batch, N, P, cfg, softcfg, device)
    if not fixed_shape:
        return cache, state, None, decode_step
    cache.use_fixed_shape()
    step_tensor = torch.zeros((), dtype=torch.long, device=device)
    if device.type == "cuda":  # CUDA graphs replay on fixed addresses
        for t in (*cache.layer_keys, *cache.layer_values, cache.position, cache.key_positions, state.history,
                  state.schedule.scales, state.schedule.guided, step_tensor,
                  *([cache.multipliers.values] if softcfg else [])):
            torch._dynamo.mark_static_address(t)
    step_fn = decode_step if compile_backend is None else compiled_decode_step(
        compile_backend, cuda_graphs=device.type == "cuda")
    workspace = _WORKSPACES.setdefault(model, {})[key] = (cache, state, step_tensor, step_fn)
    return workspace


def compiled_decode_step(backend: str = "inductor", cuda_graphs: bool = False):
    """A fresh `torch.compile(decode_step, fullgraph=True)` (CUDA graphs on a GPU).

    Dynamo keeps its graphs per code object, so each call wraps its own copy of
    `decode_step`'s code: `generate` keeps one per workspace (model, shape, settings),
    which compiles once and never competes with other models for the recompile limit.
    """
    copy = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__,
                              decode_step.__name__, decode_step.__defaults__)
    mode = "reduce-overhead" if cuda_graphs and backend == "inductor" else None
    return torch.compile(copy, backend=backend, mode=mode, fullgraph=True, dynamic=False)


def _check_labels(model: GuidedModel, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer tensor of class ids, got dtype "
                         f"{labels.dtype} and shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("labels is empty: pass at least one class id")
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"class labels must lie in [0, {model.num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _activation_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype K/V arrive in: the autocast dtype if autocast is on, else the weights' dtype."""
    try:  # torch >= 2.4 takes the device type
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except TypeError:  # older torch: CUDA autocast only
        if device.type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return next(model.parameters()).dtype
