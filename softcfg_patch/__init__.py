"""SoftCFG: confidence-weighted classifier-free guidance for autoregressive image models.

The method lives here once; models only describe their architecture.

    Guidance        the validated settings (guidance.py)
    step            the one guided step in stages: mix, temperature, filter, sample,
                    confidence, multipliers (step.py), shared by every driver
    generate        sample tokens with CFG / SoftCFG, optionally compiled (sampler.py)
    decode_step     one fixed-shape-capable decode step, what torch.compile takes (sampler.py)
    guided_logits   teacher-forced softmax inputs of the sampler (sampler.py)
    StaticKVCache   preallocated [cond; uncond] KV cache applying the multipliers (cache.py)
    rule            confidences -> multipliers, every variant of the paper and code (rule.py)
"""
from . import step
from .cache import MultiplierTable, StaticKVCache
from .guidance import Guidance, guidance_schedule
from .rule import image_position_weights, multipliers, token_confidence
from .sampler import GuidedModel, decode_loop, decode_step, generate, guided_logits

__all__ = [
    "Guidance", "guidance_schedule", "StaticKVCache", "MultiplierTable", "GuidedModel", "generate",
    "decode_step", "step",
    "guided_logits", "decode_loop", "multipliers", "image_position_weights", "token_confidence",
]
