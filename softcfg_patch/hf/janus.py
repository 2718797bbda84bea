"""SoftCFG for Janus / Janus-Pro image generation through stock `generate(generation_mode="image")`.

Janus builds its batch as `input_ids.repeat(2, 1)`: rows [0, B) conditional, rows
[B, 2B) unconditional (prompt replaced by padding except BOS / BOI). The SoftCFG cache
and logits processor (hf.cache, hf.sampler) plug into that batch; nothing else is Janus
specific.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..guidance import Guidance
from .cache import MultiplierCache, make_cache
from .generate import cache_argument
from .sampler import SoftCFGLogitsProcessor

__all__ = ["janus_softcfg", "janus_generate_images"]


def janus_softcfg(model: torch.nn.Module, guidance: Guidance, batch_size: int, prompt_length: int,
                  generator: Optional[torch.Generator] = None, cache_implementation: str = "static",
                  structural_token_ids: Iterable[int] = ()) -> tuple[MultiplierCache, SoftCFGLogitsProcessor]:
    """The (cache, logits processor) pair for Janus `generate(generation_mode="image")`.

    Janus builds its batch as `input_ids.repeat(2, 1)`: rows [0, B) conditional, rows
    [B, 2B) unconditional (prompt replaced by padding except BOS / BOI).
    """
    num_image_tokens = model.model.vision_model.config.num_image_tokens
    cache = make_cache(model, guidance, cache_implementation, prompt_length + num_image_tokens)
    processor = SoftCFGLogitsProcessor(guidance, num_image_tokens, torch.arange(batch_size),
                                       torch.arange(batch_size, 2 * batch_size), cache, generator,
                                       structural_token_ids)
    return cache, processor


@torch.no_grad()
def janus_generate_images(model: torch.nn.Module, input_ids: torch.Tensor, guidance: Guidance,
                          attention_mask: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None,
                          cache_implementation: str = "static", **generate_kwargs) -> torch.Tensor:
    """Janus image tokens [B, num_image_tokens] with CFG / SoftCFG through stock `generate`.

    Guidance, schedule, temperature and sampling come from `guidance` and `generator`;
    Janus's own CFG processor still runs (it halves the batch) but sees identical rows.
    """
    from transformers import LogitsProcessorList

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Expand here: the processor must know the final number of (cond, uncond) pairs.
    copies = generate_kwargs.pop("num_return_sequences", 1)
    input_ids = input_ids.repeat_interleave(copies, dim=0)
    attention_mask = attention_mask.repeat_interleave(copies, dim=0)
    cache, processor = janus_softcfg(model, guidance, input_ids.shape[0], input_ids.shape[1],
                                     generator, cache_implementation)
    # Janus only appends its (row-halving) CFG processor for scales > 1; the value is moot
    janus_scale = guidance.guidance_scale if guidance.guidance_scale > 1 else 2.0
    tokens = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            generation_mode="image", do_sample=False, guidance_scale=janus_scale,
                            num_return_sequences=1,
                            logits_processor=LogitsProcessorList([processor]),
                            **{cache_argument(model): cache}, **generate_kwargs)
    if not torch.equal(tokens.to(processor.tokens.device), processor.tokens):
        raise RuntimeError("Janus did not keep the SoftCFG tokens; pass do_sample=False and no "
                           "extra logits processors that change the scores")
    return tokens
