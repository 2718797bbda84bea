"""Guided autoregressive decoding: generate() and guided_logits().

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
    decode(tokens, step, cache) -> [rows, V]      feeds x_{step-1}, logits predicting x_step

Models route every attention through `cache.attend(...)`; they never see guidance.
A model that needs per-sequence values at every step (RAR's adaLN class embedding)
keeps them in `cache.state` from prefill() to decode().
The batch is [conditional rows; unconditional rows] and the sampler owns the
bookkeeping: schedule, guided logits, temperature, sampling, confidences, multipliers.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from .cache import StaticKVCache
from .guidance import Guidance, guidance_schedule
from .rule import image_position_weights, token_confidence


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
    def decode(self, tokens: torch.Tensor, step: int, cache: StaticKVCache) -> torch.Tensor: ...


# on_step(step, cond_logits, uncond_logits, guided_over_temp, tokens, cache); uncond is None without CFG.
StepHook = Callable[[int, torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, StaticKVCache], None]


@torch.no_grad()
def generate(model: GuidedModel, labels: torch.Tensor, guidance: Guidance,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample N image tokens per label with CFG / SoftCFG. Returns LongTensor [B, N].

    With `generator=None` the global RNG is used, exactly like the upstream code.
    """
    return decode_loop(model, labels, guidance, generator=generator)[0]


@torch.no_grad()
def guided_logits(model: GuidedModel, labels: torch.Tensor, tokens: torch.Tensor,
                  guidance: Guidance) -> torch.Tensor:
    """Teacher forcing: the exact softmax inputs the sampler uses at each step, [B, N, V].

    The guided logits divided by the temperature, given `tokens` as the sampled
    history; SoftCFG confidences come from these tokens.
    """
    steps = []
    decode_loop(model, labels, guidance, forced_tokens=tokens,
                on_step=lambda t, c, u, guided, x, cache: steps.append(guided.float()))
    return torch.stack(steps, dim=1)


@torch.no_grad()
def decode_loop(model: GuidedModel, labels: torch.Tensor, guidance: Guidance, *,
                generator: Optional[torch.Generator] = None,
                forced_tokens: Optional[torch.Tensor] = None,
                on_step: Optional[StepHook] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode loop behind generate() and guided_logits().

    Returns (tokens [B, N], confidences [B, N]); confidences are zeros unless SoftCFG
    is on. `forced_tokens` replaces sampling (teacher forcing); `on_step` sees every
    step's logits and the cache (tests and analysis use it).
    """
    labels = _check_labels(model, labels)
    B, N, P = labels.shape[0], model.num_image_tokens, model.num_prefix_positions
    device = labels.device
    if forced_tokens is not None and tuple(forced_tokens.shape) != (B, N):
        raise ValueError(f"tokens must have shape ({B}, {N}), got {tuple(forced_tokens.shape)}")

    # Upstream draws B uniforms for its (probability 0) label dropout before the loop;
    # drawing them too keeps our token stream identical to the reference for a seed.
    torch.rand(B, generator=generator, device=device)

    conditions = model.condition_ids(labels)
    if guidance.uses_cfg:
        conditions = torch.cat([conditions, model.none_condition_ids(labels)])
    uncond_rows = slice(B, 2 * B)
    cache = StaticKVCache(model.num_layers, conditions.shape[0], model.num_heads, P + N - 1,
                          model.head_dim, device=device, dtype=_activation_dtype(model, device))
    if guidance.uses_softcfg:
        cache.enable_multipliers(guidance.softcfg_target)

    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    history = torch.zeros(B, N, dtype=torch.float32, device=device)
    logits = model.prefill(conditions, cache)
    cache.advance(P)
    for t in range(N):
        if t > 0:
            if guidance.uses_softcfg:
                cache.set_multipliers(uncond_rows, P, image_position_weights(
                    history[:, :t], guidance.softcfg_strength, guidance.step_norm,
                    guidance.softcfg_min_weight, guidance.softcfg_align))
            previous = tokens[:, t - 1]
            if guidance.uses_cfg:
                previous = torch.cat([previous, previous])
            logits = model.decode(previous, t, cache)
            cache.advance(1)

        cond, uncond = (logits[:B], logits[B:]) if guidance.uses_cfg else (logits, None)
        guided = _guide(cond, uncond, t, N, guidance) / guidance.randomize_temperature
        if forced_tokens is None:
            probs = F.softmax(guided.float(), dim=-1)
            tokens[:, t] = torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
        else:
            tokens[:, t] = forced_tokens[:, t]
        if guidance.uses_softcfg:
            history[:, t] = token_confidence(cond, tokens[:, t], guidance.randomize_temperature,
                                             guidance.softcfg_confidence)
        if on_step is not None:
            on_step(t, cond, uncond, guided, tokens[:, t], cache)
    return tokens, history


def _guide(cond: torch.Tensor, uncond: Optional[torch.Tensor], step: int, num_steps: int,
           guidance: Guidance) -> torch.Tensor:
    if uncond is None:
        return cond
    scale = guidance_schedule(step, num_steps, guidance.guidance_scale,
                              guidance.guidance_scale_pow, device=cond.device)
    return uncond + (cond - uncond) * scale


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
