#!/usr/bin/env python
"""Emu3-Gen text-to-image with SoftCFG, through both Hugging Face drivers.

    python scripts/t2i_emu3.py --model /path/to/Emu3-Gen-hf --prompt "a portrait of young girl." \
        --softcfg-strength 1 --seed 0 --out emu3.png

The settings are those of the official Emu3-Gen example: the positive suffix and the
negative prompt below, CFG scale 3.0, sampling with top_k 2048 at temperature 1, ratio
1:1 over a 720x720 area, and the prefix constraint that lays out the image grid (a row
of visual tokens, then end-of-line; end-of-frame, end-of-image, end-of-sequence).

Drivers (--driver): `unbatched` is the official way, stock `model.generate` with the CFG
processor swapped for `SoftCFGUnbatchedLogitsProcessor` (first in the list, then the
prefix constraint); `batched` is `softcfg_patch.hf.generate`, one [cond; uncond] batch
per step (faster), with the same constraint through its `logits_processor` hook. `both`
(default) runs the two from the same seed and reports whether they agree. Each driver
writes OUT_<driver>.png. Nothing is downloaded: pass a local folder (see --help of
--model). `--tiny` runs a tiny random Emu3 instead (CI; the images are noise).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Before transformers is imported: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from softcfg_patch.errors import SoftCFGError, exit_on_error  # noqa: E402

HUB_ID = "BAAI/Emu3-Gen-hf"
POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
                   "fewer digits, cropped, worst quality, low quality, normal quality, jpeg "
                   "artifacts, signature, watermark, username, blurry.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help=f"local folder of {HUB_ID}; get it with "
                                    f"`huggingface-cli download {HUB_ID} --local-dir Emu3-Gen-hf`")
    p.add_argument("--tiny", action="store_true", help="tiny random Emu3 (CI; images are noise)")
    p.add_argument("--prompt", action="append", help="repeat for a batch of prompts (default: the example's)")
    p.add_argument("--positive-suffix", default=POSITIVE_SUFFIX)
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    p.add_argument("--driver", choices=("unbatched", "batched", "both"), default="both")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--guidance-scale-pow", type=float, default=0.0,
                   help="cosine schedule power k; 0 = constant scale, as in the official example")
    p.add_argument("--softcfg-strength", type=float, default=1.0, help="alpha; 0 = plain CFG")
    p.add_argument("--step-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--softcfg-target", choices=("v", "k", "kv"), default="v")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=2048)
    p.add_argument("--ratio", default="1:1")
    p.add_argument("--image-area", type=int, default=720 * 720)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", choices=("static", "dynamic"), default="dynamic",
                   help="cache of the batched driver")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", default="emu3_softcfg.png")
    args = p.parse_args(argv)
    if args.tiny and args.prompt:
        p.error("--tiny uses fixed random prompt ids; --prompt needs --model")
    if not args.tiny and not args.model:
        p.error(f"--model is required (or --tiny); get the weights with "
                f"`huggingface-cli download {HUB_ID} --local-dir Emu3-Gen-hf`")
    return args


@dataclass
class Emu3Request:
    """Prompt ids and the image grid: height x width visual tokens, one end-of-line per row."""
    cond_ids: "torch.Tensor"
    cond_mask: "torch.Tensor"
    neg_ids: "torch.Tensor"
    neg_mask: "torch.Tensor"
    height: int
    width: int
    wrapper: int  # <|image token|>: the grid starts after it
    eol: int
    eof: int
    eoi: int
    eos: int
    pad: int
    visual: "list | torch.Tensor"  # the visual token ids
    pixel_mean: tuple = (0.5, 0.5, 0.5)  # the VQ decoder's output normalisation
    pixel_std: tuple = (0.5, 0.5, 0.5)

    @property
    def num_tokens(self) -> int:
        return self.height * (self.width + 1) + 3  # rows with end-of-line, then eof, eoi, eos

    def allowed_tokens(self, batch_id: int, input_ids) -> list:
        """prefix_allowed_tokens_fn of the grid: what may follow `input_ids` (one row)."""
        start = int((input_ids == self.wrapper).nonzero()[0, 0])
        offset = input_ids.shape[0] - start  # 1 for the first generated token
        row_end = (self.width + 1) * self.height
        if offset > row_end + 3:
            return [self.pad]
        fixed = {row_end + 1: self.eof, row_end + 2: self.eoi, row_end + 3: self.eos}
        if offset in fixed:
            return [fixed[offset]]
        return [self.eol] if offset % (self.width + 1) == 0 else self.visual


# ------------------------------------------------------------------- models

def tiny_emu3(seed: int = 0):
    """A tiny random Emu3ForConditionalGeneration (2 layers, GQA, 16-code VQ) and its request."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    special = {"<|endoftext|>": 0, "<|extra_203|>": 1, "<|extra_204|>": 2, "<|image start|>": 3,
               "<|image token|>": 4, "<|extra_200|>": 5, "<|extra_201|>": 6, "<|image end|>": 7,
               "<image>": 8}
    visual = {f"<|visual token {i:06d}|>": 32 + i for i in range(16)}
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    vq = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
              temporal_downsample_factor=1)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq, text_config=text,
                                                    vocabulary_map={**special, **visual})).eval()
    # <bos> text <|image start|> "3*4" <|image token|>, the second prompt left-padded
    cond = torch.tensor([[1, 10, 11, 12, 3, 20, 21, 4], [0, 1, 13, 14, 3, 20, 21, 4]])
    neg = torch.tensor([[1, 15, 3, 20, 21, 4]])
    request = Emu3Request(cond, (cond != 0).long(), neg, torch.ones_like(neg), height=3, width=4,
                          wrapper=4, eol=5, eof=6, eoi=7, eos=2, pad=0,
                          visual=sorted(visual.values()))
    return model, request


MISSING_MODEL = (
    "no Emu3 model folder at {model!r} (this script never downloads).\n"
    "On a machine with internet run:\n"
    "    huggingface-cli download {hub} --local-dir Emu3-Gen-hf\n"
    "(about 35 GB; or `hf download {hub}`), copy the folder here and pass --model /path/to/Emu3-Gen-hf"
)


def load(args, device: str, dtype):
    """Emu3-Gen and the request for --prompt from a local folder; SoftCFGError with a how-to if absent."""
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    if not Path(args.model).is_dir():
        raise SoftCFGError(MISSING_MODEL.format(model=args.model, hub=HUB_ID))
    try:
        processor = Emu3Processor.from_pretrained(args.model, local_files_only=True)
        model = Emu3ForConditionalGeneration.from_pretrained(args.model, local_files_only=True,
                                                             dtype=dtype)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise SoftCFGError(MISSING_MODEL.format(model=args.model, hub=HUB_ID)
                         + f"\n({type(exc).__name__}: {reason})") from None
    processor.tokenizer.padding_side = "left"  # generate appends at the end of every row
    kwargs = dict(return_for_image_generation=True, ratio=args.ratio, image_area=args.image_area,
                  padding=True, return_tensors="pt")
    prompts = [p + args.positive_suffix for p in args.prompt or ["a portrait of young girl."]]
    cond = processor(text=prompts, **kwargs)
    neg = processor(text=[args.negative_prompt], **kwargs)
    height, width = cond["image_sizes"][0]
    tok, pixels = processor.tokenizer, processor.image_processor
    request = Emu3Request(
        cond["input_ids"], cond["attention_mask"], neg["input_ids"], neg["attention_mask"],
        int(height), int(width), wrapper=tok.convert_tokens_to_ids(processor.fake_token_around_image),
        eol=model.vocabulary_mapping.eol_token_id, eof=tok.convert_tokens_to_ids(processor.eof_token),
        eoi=tok.convert_tokens_to_ids(processor.image_end_token), eos=tok.eos_token_id,
        pad=tok.pad_token_id, visual=torch.tensor(model.vocabulary_mapping.image_tokens, device=device),
        pixel_mean=tuple(pixels.image_mean), pixel_std=tuple(pixels.image_std))
    return model.to(device).eval(), request


# ------------------------------------------------------------------ drivers

def guidance_for(args, top_k: int):
    from softcfg_patch import Guidance

    return Guidance(guidance_scale=args.guidance_scale, guidance_scale_pow=args.guidance_scale_pow,
                    randomize_temperature=args.temperature, softcfg_strength=args.softcfg_strength,
                    step_norm=args.step_norm, softcfg_target=args.softcfg_target, top_k=top_k)


def constraint(request: Emu3Request):
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor

    return LogitsProcessorList([PrefixConstrainedLogitsProcessor(request.allowed_tokens, 1)])


def run_unbatched(model, request: Emu3Request, args, device: str):
    """Stock generate, SoftCFGUnbatchedLogitsProcessor first, then the grid constraint (official order)."""
    import torch

    from softcfg_patch.hf import SoftCFGUnbatchedLogitsProcessor

    cfg = SoftCFGUnbatchedLogitsProcessor(
        guidance_for(args, top_k=0), model, unconditional_ids=request.neg_ids.to(device),
        unconditional_attention_mask=request.neg_mask.to(device), max_new_tokens=request.num_tokens,
        structural_token_ids=[request.eol, request.eof])
    torch.manual_seed(args.seed)
    out = model.generate(input_ids=request.cond_ids.to(device),
                         attention_mask=request.cond_mask.to(device),
                         max_new_tokens=request.num_tokens, do_sample=True, top_k=args.top_k,
                         temperature=args.temperature, eos_token_id=request.eos,
                         pad_token_id=request.pad, logits_processor=[cfg, *constraint(request)])
    return out[:, request.cond_ids.shape[1]:]


def run_batched(model, request: Emu3Request, args, device: str):
    """softcfg_patch.hf.generate: [cond; uncond] in one batch, the same constraint via its hook."""
    import torch

    from softcfg_patch.hf import generate

    torch.manual_seed(args.seed)  # the global RNG, as stock generate draws from it
    return generate(model, request.cond_ids.to(device), request.neg_ids.to(device),
                    guidance_for(args, top_k=args.top_k), request.num_tokens,
                    structural_token_ids=[request.eol, request.eof],
                    cond_attention_mask=request.cond_mask.to(device),
                    uncond_attention_mask=request.neg_mask.to(device),
                    cache_implementation=args.cache, pad_token_id=request.pad,
                    logits_processor=constraint(request))


def decode(model, tokens, request: Emu3Request):
    """uint8 images [B, H, W, 3] from the generated grids (undoing the image processor's normalisation)."""
    import torch

    with torch.no_grad():
        pixels = model.decode_image_tokens(image_tokens=tokens, height=request.height,
                                           width=request.width).float().permute(0, 2, 3, 1)
    pixels = pixels * pixels.new_tensor(request.pixel_std) + pixels.new_tensor(request.pixel_mean)
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def run(args: argparse.Namespace) -> dict:
    """{driver: (tokens [B, N], images uint8 [B, H, W, 3])}; writes OUT_<driver>.png per driver."""
    import torch

    try:
        import softcfg_patch.hf  # noqa: F401  (needs the optional transformers extra)
        guidance_for(args, top_k=args.top_k)  # validate the settings before loading anything
    except (ImportError, ValueError) as exc:
        raise SoftCFGError(str(exc)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[args.dtype]
    if args.tiny:
        model, request = tiny_emu3(args.seed)
        model = model.to(device=device, dtype=dtype)
    else:
        model, request = load(args, device, dtype)
    drivers = {"unbatched": run_unbatched, "batched": run_batched}
    chosen = list(drivers) if args.driver == "both" else [args.driver]
    results = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        with torch.no_grad():
            tokens = drivers[name](model, request, args, device)
        images = decode(model, tokens, request)
        path = out.with_name(f"{out.stem}_{name}{out.suffix or '.png'}")
        strip(images).save(path)
        print(f"wrote {path} ({name} driver, {tokens.shape[0]} image(s), "
              f"{tokens.shape[1]} tokens each)")
        results[name] = (tokens.cpu(), images)
    if len(results) == 2:
        same = (results["unbatched"][0] == results["batched"][0]).float().mean().item()
        print(f"the two drivers agree on {same:.1%} of the tokens")
    return results


def strip(images, gap: int = 8):
    """One PIL image: the HxWx3 arrays left to right, separated by white columns."""
    import numpy as np
    from PIL import Image

    white = np.full((images[0].shape[0], gap, 3), 255, dtype=np.uint8)
    parts = [part for image in images for part in (image, white)][:-1]
    return Image.fromarray(np.concatenate(parts, axis=1))


@exit_on_error()  # bad input: `error: ...` on stderr, exit status 2
def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
