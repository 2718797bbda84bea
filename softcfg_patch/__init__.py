"""SoftCFG: confidence-weighted classifier-free guidance for autoregressive image models.

The method lives here once; models only describe their architecture.

    Guidance        the validated settings; runs_cfg / method: the one rule for whether
                    guidance runs at a scale, per model (guidance.py)
    step            the one guided step in stages: mix, temperature, filter, sample,
                    confidence, multipliers (step.py), shared by every driver
    generate        sample tokens with CFG / SoftCFG, optionally compiled (sampler.py)
    decode_step     one fixed-shape-capable decode step, what torch.compile takes (sampler.py)
    guided_logits   teacher-forced softmax inputs of the sampler (sampler.py)
    StaticKVCache   preallocated [cond; uncond] KV cache applying the multipliers (cache.py)
    rule            confidences -> multipliers, every variant of the paper and code (rule.py)

The names are imported on first use (PEP 562), so tools that only read the model registry
or result rows (scripts/collect_results.py) do not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"  # the one place of the version (pyproject.toml reads it)

_SOURCES = {  # exported name -> submodule that defines it
    "Guidance": "guidance", "guidance_schedule": "guidance", "runs_cfg": "guidance", "runs_softcfg": "guidance",
    "method": "guidance",
    "StaticKVCache": "cache", "MultiplierTable": "cache",
    "GuidedModel": "sampler", "generate": "sampler", "decode_step": "sampler",
    "guided_logits": "sampler", "decode_loop": "sampler",
    "multipliers": "rule", "aligned_multipliers": "rule", "token_confidence": "rule",
}
# Submodules reachable as attributes (softcfg_patch.step), imported on first use like the names.
_SUBMODULES = ("step", "guidance", "cache", "rule", "sampler", "precision", "files", "layers")

__all__ = [
    "__version__", "Guidance", "guidance_schedule", "runs_cfg", "runs_softcfg", "method", "StaticKVCache", "MultiplierTable",
    "GuidedModel", "generate", "decode_step", "step", "guided_logits", "decode_loop", "multipliers",
    "aligned_multipliers", "token_confidence",
]

__getattr__, __dir__ = lazy_exports(__name__, _SOURCES, _SUBMODULES, __all__)

if TYPE_CHECKING:  # static analysers see the eager imports
    from . import step
    from .cache import MultiplierTable, StaticKVCache
    from .guidance import Guidance, guidance_schedule, method, runs_cfg, runs_softcfg
    from .rule import aligned_multipliers, multipliers, token_confidence
    from .sampler import GuidedModel, decode_loop, decode_step, generate, guided_logits
