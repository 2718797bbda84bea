"""The SoftCFG rule: token confidences -> per-position multipliers.

Pure tensor functions with no model knowledge. Every driver (the ImageNet sampler,
the Hugging Face cache) calls these, so the rule lives in exactly one place.

Vocabulary used below. At decode step t the model predicts x_t; the cache then holds
the prefix positions (never scaled) followed by the positions of x_0 .. x_{t-1}.
`history` is the confidences c_0 .. c_{t-1} recorded so far, one row per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Keeps the step-normalised ratio finite when all confidences are ~0 (released code).
STEP_NORM_EPS = 1e-5


def token_confidence(cond_logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                     kind: str = "sampled") -> torch.Tensor:
    """Confidence of the conditional branch in this step's token, float32 [B].

    kind="sampled": p(x_t) under softmax(z_c / T) (released code);
    kind="max":     max of that softmax (paper text).
    """
    probs = F.softmax(cond_logits.float() / temperature, dim=-1)
    if kind == "sampled":
        return probs.gather(-1, tokens.view(-1, 1)).squeeze(-1)
    if kind == "max":
        return probs.amax(dim=-1)
    raise ValueError(f"unknown confidence kind {kind!r}; expected 'sampled' or 'max'")


def multipliers(conf: torch.Tensor, strength: float, step_norm: bool,
                min_weight: float = 0.05) -> torch.Tensor:
    """Multipliers for the scaled positions, given the confidences assigned to them.

    Step Normalization on:  m = max(min_weight, (1 - c / (sum c + eps)) ** alpha)
      -- the removed mass sum(1 - m) is ~alpha at every step, whatever the length.
    Step Normalization off: m = (1 - c) ** alpha  (alpha = 1 is the released code).
    alpha = 0 gives all ones: plain CFG.
    """
    if strength == 0:
        return torch.ones_like(conf)
    if step_norm:
        share = conf / (conf.sum(dim=-1, keepdim=True) + STEP_NORM_EPS)
        return ((1 - share) ** strength).clamp_min(min_weight)
    return (1 - conf) ** strength


def aligned_multipliers(history: torch.Tensor, strength: float, step_norm: bool,
                           min_weight: float = 0.05, align: str = "source") -> torch.Tensor:
    """Weights for the positions of x_0 .. x_{t-1} during the forward of step t, [B, t].

    align="source" (released code): the confidence of the prediction made *at* a
      position weighs that position. The position of x_{k-1} made the prediction x_k,
      so x_0 .. x_{t-2} get c_1 .. c_{t-1}; c_0 was predicted at the (unscaled)
      prefix and is dropped, and x_{t-1}, appended in this step, keeps weight 1.
    align="token" (paper text): the position of x_k is weighed by c_k itself.
    """
    if align == "source":
        scaled = multipliers(history[:, 1:], strength, step_norm, min_weight)
        return torch.cat([scaled, torch.ones_like(history[:, :1])], dim=1)
    if align == "token":
        return multipliers(history, strength, step_norm, min_weight)
    raise ValueError(f"unknown alignment {align!r}; expected 'source' or 'token'")
