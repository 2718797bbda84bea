"""The batched [cond; uncond] loop for `transformers` causal LMs whose image tokens are ordinary
vocabulary entries: `generate`, with `cfg_batch` (the left-padded batch) and the one model
forward every driver here uses (`model_forward`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ..guidance import Guidance, runs_cfg
from ..step import StepHook
from .cache import make_cache
from .sampler import SoftCFGSampler

__all__ = ["generate", "cfg_batch", "cache_argument", "model_forward"]


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
    cfg = runs_cfg(guidance, model)
    if cfg and uncond_ids is None:
        raise ValueError(f"uncond_ids is None but guidance_scale is {guidance.guidance_scale}: "
                         f"CFG needs the unconditional prompt ids (e.g. just BOS and "
                         f"<begin-of-image>), or pass Guidance(guidance_scale=0) for no CFG")
    if pad_token_id is None:
        pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    cond_ids = torch.atleast_2d(cond_ids)
    batch = cond_ids.shape[0]
    if cfg:
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
    logits = model_forward(model, ids, mask[:, :prompt_length], positions, cache)
    for step in range(max_new_tokens):
        token = sampler(logits)
        if step + 1 == max_new_tokens:
            break
        positions = positions[:, -1:] + 1
        step_mask = mask if cache_implementation == "static" else mask[:, :prompt_length + step + 1]
        logits = model_forward(model, sampler.row_tokens(token, ids.shape[0])[:, None], step_mask,
                          positions, cache)
    return sampler.tokens


def model_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor, cache) -> torch.Tensor:
    cache_keyword, takes_logits_to_keep = _forward_keywords(type(model))
    kwargs = {cache_keyword: cache, "use_cache": True}
    if takes_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    return out.logits[:, -1]
