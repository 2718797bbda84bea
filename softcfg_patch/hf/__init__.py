"""SoftCFG for Hugging Face `transformers` decoders (optional extra: transformers >= 5.22).

Any decoder that generates image tokens through a KV cache gets SoftCFG without a change
to its modeling code. The modules, each built on the ones before it:

    cache       SoftCFGCache / SoftCFGStaticCache: drop-in DynamicCache / StaticCache that
                return K/V scaled by the one multiplier table (conditional rows and prompt
                positions bit for bit); make_cache
    sampler     SoftCFGSampler: one guided step per call (the stages of softcfg_patch.step,
                in the ImageNet sampler's order); SoftCFGLogitsProcessor: it, inside stock
                `model.generate`
    generate    generate(): the batched [cond; uncond] loop; cfg_batch, cache_argument
    unbatched   SoftCFGUnbatchedLogitsProcessor: drop-in for transformers'
                UnbatchedClassifierFreeGuidanceLogitsProcessor (Emu3-Gen, Chameleon/Anole,
                Lumina-mGPT)
    janus       janus_generate_images / janus_softcfg: Janus image mode through its generate

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
                      structural_token_ids=[9002],   # e.g. end-of-line: multiplier 1, not normalised
                      cache_implementation="static") # or "dynamic"
    # tokens: LongTensor [1, 1024]; feed them to your VQ decoder.

With stock `model.generate` instead: build the batch with `cfg_batch`, pass
`cache=SoftCFGCache(...)` and `logits_processor=[SoftCFGLogitsProcessor(...)]` with
`do_sample=False`; the processor samples and forces its token on both rows.
"""
from __future__ import annotations

try:
    import transformers
except ImportError as exc:  # the base install does not include transformers
    raise ImportError("softcfg_patch.hf needs the optional extra: pip install 'softcfg[hf]' "
                      "(transformers>=5.22)") from exc

from ..versions import version_tuple

MIN_TRANSFORMERS = (5, 22)
if version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(f"softcfg_patch.hf needs transformers>=5.22, found {transformers.__version__}")

from .cache import MultiplierCache, SoftCFGCache, SoftCFGStaticCache, make_cache  # noqa: E402
from .generate import cache_argument, cfg_batch, generate, model_forward  # noqa: E402
from .janus import janus_generate_images, janus_softcfg  # noqa: E402
from .sampler import SoftCFGLogitsProcessor, SoftCFGSampler  # noqa: E402
from .unbatched import SoftCFGUnbatchedLogitsProcessor  # noqa: E402

__all__ = [
    "SoftCFGCache", "SoftCFGStaticCache", "MultiplierCache", "make_cache", "SoftCFGSampler",
    "SoftCFGLogitsProcessor", "cfg_batch", "cache_argument", "model_forward", "generate",
    "SoftCFGUnbatchedLogitsProcessor", "janus_softcfg", "janus_generate_images",
]
