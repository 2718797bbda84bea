"""SoftCFG: confidence-weighted classifier-free guidance for autoregressive image models.

The method lives here once; models only describe their architecture.

    Guidance        the validated settings (guidance.py)
    generate        sample tokens with CFG / SoftCFG (sampler.py)
    guided_logits   teacher-forced softmax inputs of the sampler (sampler.py)
    StaticKVCache   preallocated [cond; uncond] KV cache applying the multipliers (cache.py)
    rule            confidences -> multipliers, every variant of the paper and code (rule.py)
"""
from .cache import StaticKVCache
from .guidance import Guidance, guidance_schedule
from .rule import image_position_weights, multipliers, token_confidence
from .sampler import GuidedModel, decode_loop, generate, guided_logits

__all__ = [
    "Guidance", "guidance_schedule", "StaticKVCache", "GuidedModel", "generate",
    "guided_logits", "decode_loop", "multipliers", "image_position_weights", "token_confidence",
]
