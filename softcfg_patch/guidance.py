"""Guidance settings and the guidance-scale schedule.

`Guidance` carries every knob of the method (README: "What SoftCFG does, exactly"). The defaults are the
semantics of the authors' released code, which produced the paper's FIDs; the
paper-text reading is one option away (`softcfg_confidence="max"`,
`softcfg_align="token"`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the schedule is computed: the settings alone do not need it
    import torch

CONFIDENCES = ("sampled", "max")
ALIGNMENTS = ("source", "token")
TARGETS = ("v", "k", "kv")


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})  # the samplers' --help prints `help`


@dataclass(frozen=True)
class Guidance:
    """Everything that decides how one guided sample is drawn; each field's `help` says what
    it does. Which scale means "unguided" is the model's convention: see `runs_cfg`."""

    guidance_scale: float = _setting(3.0, "gamma; guidance is off at 0 (AliTok, RAR) or at <= 1 (LlamaGen)")
    guidance_scale_pow: float = _setting(1.0, "k of the cosine schedule; 0 gives a constant scale gamma")
    randomize_temperature: float = _setting(1.0, "softmax temperature applied to the guided logits")
    softcfg_strength: float = _setting(0.0, "alpha; 0 is plain CFG, bit for bit")
    step_norm: bool = _setting(True, "Step Normalization (bounds the removed mass to ~one token)")
    softcfg_confidence: str = _setting("sampled", '"sampled" (released code) or "max" (paper text)')
    softcfg_align: str = _setting("source", '"source" (released code) or "token" (paper text)')
    softcfg_min_weight: float = _setting(0.05, "floor of the step-normalised multipliers")
    softcfg_target: str = _setting("v", 'which cache tensor the multipliers scale: "v", "k" or "kv"')
    top_k: int = _setting(0, "keep the k largest guided logits (after the temperature); 0 = off")
    top_p: float = _setting(1.0, "nucleus filter on what top-k left (the first token past the threshold is "
                                 "kept); 1.0 = off")
    cfg_interval: float = _setting(-1.0, "LlamaGen's: the step predicting x_t (t >= 1) samples the conditional "
                                         "logits alone once t - 1 > cfg_interval; -1 = off")

    def __post_init__(self) -> None:
        _check_number("guidance_scale", self.guidance_scale, low=0.0)
        _check_number("guidance_scale_pow", self.guidance_scale_pow, low=0.0)
        _check_number("randomize_temperature", self.randomize_temperature, low=0.0, strict=True)
        _check_number("softcfg_strength", self.softcfg_strength, low=0.0)
        _check_number("softcfg_min_weight", self.softcfg_min_weight, low=0.0, high=1.0)
        if not isinstance(self.step_norm, bool):
            raise ValueError(f"step_norm must be True or False, got {self.step_norm!r}")
        _check_choice("softcfg_confidence", self.softcfg_confidence, CONFIDENCES)
        _check_choice("softcfg_align", self.softcfg_align, ALIGNMENTS)
        _check_choice("softcfg_target", self.softcfg_target, TARGETS)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check_number("top_p", self.top_p, low=0.0, high=1.0, strict=True)
        _check_number("cfg_interval", self.cfg_interval, low=-1.0)

    @classmethod
    def from_config(cls, cfg) -> "Guidance":
        """Build from any mapping (dict, OmegaConf node) holding some of the field names."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: cfg[k] for k in names if k in cfg})

    def to_dict(self) -> dict:
        return asdict(self)


# Which guidance_scale means "no guidance" (one conditional branch, no unconditional rows) is
# each upstream's convention: AliTok and RAR guide at every scale but 0, LlamaGen only above 1,
# transformers' unbatched CFG processor at every scale but 1.
UNGUIDED_AT = {"0": lambda scale: scale == 0, "<=1": lambda scale: scale <= 1, "1": lambda scale: scale == 1}


def runs_cfg(guidance: Guidance, model=None) -> bool:
    """Whether the [cond; uncond] rows run: the one rule every driver, manifest and table uses.

    `model` (a model, a registry family, a logits processor) names its convention in an
    `unguided_at` attribute, a key of UNGUIDED_AT; without one, scale 0 means unguided.
    """
    rule = getattr(model, "unguided_at", "0")
    if rule not in UNGUIDED_AT:
        raise ValueError(f"{type(model).__name__}.unguided_at is {rule!r}; expected one of {', '.join(UNGUIDED_AT)}")
    return not UNGUIDED_AT[rule](guidance.guidance_scale)


def runs_softcfg(guidance: Guidance, model=None) -> bool:
    return runs_cfg(guidance, model) and guidance.softcfg_strength > 0


def method(guidance: Guidance, model=None) -> str:
    """What actually runs: "noguidance", "cfg" or "softcfg" (run names, manifests, result rows)."""
    return "softcfg" if runs_softcfg(guidance, model) else "cfg" if runs_cfg(guidance, model) else "noguidance"


def _check_number(name: str, value, low: float, high: float = math.inf, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if strict else value < low
    if too_low or value > high:
        bound = f"> {low}" if strict else f">= {low}"
        if high != math.inf:
            bound += f" and <= {high}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def guidance_schedule(step: int, num_steps: int, scale: float, power: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """s_t = 1 + (gamma - 1) * (1 - cos(pi * (t / N) ** k)) / 2, as a float32 tensor of shape (1,).

    Computed in the upstream order (a Python float raised to a float32 tensor power)
    so the scale is the same float32 value the reference used.
    """
    import torch

    power_t = torch.full((1,), float(power), device=device)
    ramp = (1 - torch.cos(((step / num_steps) ** power_t) * torch.pi)) * 1 / 2
    return (scale - 1) * ramp + 1
