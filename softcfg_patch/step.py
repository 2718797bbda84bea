"""The one guided step, in separable stages, for every driver.

    mix -> temperature -> filter (top-k, top-p) -> sample -> confidence

`guide()` chains the first three (the softmax input of a step); `sample()` draws; the
SoftCFG bookkeeping (`record_confidence`, `next_multipliers*`) turns the conditional
branch's confidences into the multipliers of the next forward. The ImageNet decode
loop (sampler.py) and the Hugging Face drivers (hf.py) both call these, so a new
guidance variant is written once. A `generate` logits processor that must leave
temperature and sampling to `generate` uses `mix` and `token_confidence` alone.

Per-model rules live on the model (optional attributes of the protocol):
    unguided_at = "<=1"               which scale means "unguided" (softcfg_patch.guidance.runs_cfg;
                                      default "0": scale 0)
    rng_preamble(num_rows, generator, device) -> None
                                      random numbers upstream draws before the loop
                                      (AliTok, RAR: B uniforms; default: none)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .guidance import Guidance, guidance_schedule
from .layers import at_step
from .rule import aligned_multipliers, multipliers, token_confidence

# on_step(step, cond, uncond, guided, tokens, cache): the same hook for every driver.
# guided is the softmax input (guided logits / T, filtered); uncond is None without CFG.
StepHook = Callable[..., None]

__all__ = ["Schedule", "rng_preamble", "mix", "temperature", "filter_logits", "guide", "sample",
           "record_confidence", "token_confidence", "next_multipliers", "next_multipliers_at", "StepHook"]


# ------------------------------------------------------------------ per-model rules

def rng_preamble(model, num_rows: int, generator: Optional[torch.Generator],
                 device: torch.device) -> None:
    """Draw what the model's upstream draws before its loop (nothing unless the model says)."""
    preamble = getattr(model, "rng_preamble", None)
    if preamble is not None:
        preamble(num_rows, generator, device)


# ------------------------------------------------------------------------ stages

class Schedule:
    """The guidance scale of every step, precomputed once (float32 [N], upstream arithmetic),
    and whether the step is guided at all (cfg_interval). Indexable by an int step or a
    0-d tensor step (the compiled decode step), with the same values either way."""

    def __init__(self, guidance: Guidance, num_steps: int, device: torch.device | str = "cpu") -> None:
        self.scales = torch.cat([guidance_schedule(t, num_steps, guidance.guidance_scale,
                                                   guidance.guidance_scale_pow, device=device)
                                 for t in range(num_steps)])
        self.interval = guidance.cfg_interval
        steps = torch.arange(num_steps, device=device)
        # LlamaGen: the step predicting x_t (t >= 1) is unguided once t - 1 > cfg_interval.
        self.guided = (steps < 1) | (steps - 1 <= self.interval) | (self.interval <= -1)

    def is_guided(self, step: int) -> bool:
        return self.interval <= -1 or step < 1 or step - 1 <= self.interval


def mix(cond: torch.Tensor, uncond: Optional[torch.Tensor], step, schedule: Schedule) -> torch.Tensor:
    """Guided logits z_u + s_t (z_c - z_u) of step `step` (int or 0-d tensor); cond without CFG."""
    if uncond is None:
        return cond
    if isinstance(step, int):
        if not schedule.is_guided(step):
            return cond
        return uncond + (cond - uncond) * at_step(schedule.scales, step)
    guided = uncond + (cond - uncond) * at_step(schedule.scales, step)
    if schedule.interval > -1:  # fixed shapes: a select instead of a Python branch on t
        guided = torch.where(at_step(schedule.guided, step), guided, cond)
    return guided


def temperature(logits: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    return logits / guidance.randomize_temperature


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k (keep logits >= the k-th largest), then top-p on what is left; removed -> -inf.

    Top-p removes a token when the probability of the tokens ranked before it already
    exceeds top_p, so the first token past the threshold stays (LlamaGen's order).
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = torch.sort(logits, dim=-1, descending=True)
        past = ranked.softmax(dim=-1).cumsum(dim=-1) > top_p
        remove_ranked = torch.cat([torch.zeros_like(past[..., :1]), past[..., :-1]], dim=-1)
        remove = remove_ranked.scatter(-1, order, remove_ranked)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def guide(cond: torch.Tensor, uncond: Optional[torch.Tensor], step, schedule: Schedule,
          guidance: Guidance) -> torch.Tensor:
    """The softmax input of one step: filter(temperature(mix(...)))."""
    return filter_logits(temperature(mix(cond, uncond, step, schedule), guidance),
                         guidance.top_k, guidance.top_p)


def sample(logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One multinomial draw per row from softmax(logits) in float32: LongTensor [B]."""
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def record_confidence(history: torch.Tensor, step: int, cond: torch.Tensor, tokens: torch.Tensor,
                      guidance: Guidance) -> None:
    """history[:, step] = confidence of the conditional branch in `tokens` (unfiltered softmax(z_c / T))."""
    history[:, step] = token_confidence(cond, tokens, guidance.randomize_temperature,
                                        guidance.softcfg_confidence)


# -------------------------------------------------------------- next multipliers

def next_multipliers(history: torch.Tensor, guidance: Guidance,
                     structural: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multipliers of the generated positions x_0 .. x_{t-1} for the next forward, [B, t].

    `history` holds c_0 .. c_{t-1}. Structural positions (line/frame markers of some HF
    models) keep weight 1 and stay out of Step Normalization: the rule runs on the other
    positions only, compressed into one sequence per row, and is scattered back.
    """
    args = (guidance.softcfg_strength, guidance.step_norm, guidance.softcfg_min_weight,
            guidance.softcfg_align)
    if structural is None or not bool(structural.any()):
        return aligned_multipliers(history, *args)
    weights = torch.ones_like(history)
    keep = ~structural
    if bool((keep == keep[:1]).all()):  # usual case: markers at the same steps in every row
        columns = keep[0].nonzero().squeeze(-1)
        weights[:, columns] = aligned_multipliers(history[:, columns], *args)
        return weights
    for row in range(history.shape[0]):
        columns = keep[row].nonzero().squeeze(-1)
        weights[row, columns] = aligned_multipliers(history[row:row + 1, columns], *args)[0]
    return weights


def next_multipliers_at(history: torch.Tensor, step: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    """Fixed-shape `next_multipliers` for the forward of step `step` (a 0-d tensor).

    history: [B, N] with c_0 .. c_{t-1} filled. Returns [B, N - 1], the weights of the
    positions of x_0 .. x_{N-2}; those not scaled at this step (not yet written, or
    x_{t-1} under the "source" alignment) get 1, as in `aligned_multipliers`.
    """
    num_positions = history.shape[1] - 1
    j = torch.arange(num_positions, device=history.device)
    if guidance.softcfg_align == "source":  # position of x_j weighed by c_{j+1}, j <= t - 2
        conf, scaled = history[:, 1:], j < step - 1
    else:  # position of x_j weighed by c_j, j <= t - 1
        conf, scaled = history[:, :-1], j < step
    conf = torch.where(scaled, conf, torch.zeros_like(conf))
    m = multipliers(conf, guidance.softcfg_strength, guidance.step_norm, guidance.softcfg_min_weight)
    return torch.where(scaled, m, torch.ones_like(m))
