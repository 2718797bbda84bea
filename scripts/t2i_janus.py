#!/usr/bin/env python
"""Janus-Pro text-to-image with CFG and SoftCFG, side by side from the same seed.

    python scripts/t2i_janus.py --model PATH_OR_ID --prompt "a red fox in the snow" \
        --softcfg-strength 1 --guidance-scale 5 --seed 0 --out out.png

Left: plain CFG (softcfg_strength 0); right: SoftCFG. Both use Janus's built-in image
mode (`JanusForConditionalGeneration.generate(generation_mode="image")`) with the
SoftCFG cache and logits processor of softcfg_patch.hf. Nothing is downloaded: the
model loads from a local folder or an existing Hugging Face cache only.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before transformers is imported: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from softcfg_patch.errors import SoftCFGError, exit_on_error  # noqa: E402

HUB_ID = "deepseek-community/Janus-Pro-1B"
MISSING_MODEL = (
    "no Janus model found at {model!r} (looked for a local folder, then the Hugging Face "
    "cache; this script never downloads).\n"
    "On a machine with internet run:\n"
    "    huggingface-cli download {hub}\n"
    "(or `hf download {hub}`). It prints the snapshot folder; copy that folder (or the whole\n"
    "Hugging Face cache) to this machine and pass it: --model /path/to/Janus-Pro-1B"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help=f"local folder or cached hub id, e.g. {HUB_ID}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--softcfg-strength", type=float, default=1.0, help="alpha of the right image")
    p.add_argument("--guidance-scale", type=float, default=5.0,
                   help="CFG scale gamma (both images)")
    p.add_argument("--guidance-scale-pow", type=float, default=0.0,
                   help="cosine schedule power k; 0 = constant scale, like stock Janus")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--step-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--softcfg-target", choices=("v", "k", "kv"), default="v")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", choices=("static", "dynamic"), default="static")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", default="janus_softcfg.png")
    return p.parse_args(argv)


def load(model: str, device: str, dtype):
    """Model and processor from a local path or the HF cache; SoftCFGError with a how-to if absent."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    if not Path(model).is_dir() and "/" not in model and not model.startswith("."):
        raise SoftCFGError(MISSING_MODEL.format(model=model, hub=HUB_ID))
    try:
        processor = JanusProcessor.from_pretrained(model, local_files_only=True)
        net = JanusForConditionalGeneration.from_pretrained(model, local_files_only=True,
                                                            dtype=dtype)
    except (OSError, ValueError) as exc:  # not a folder and not in the cache
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise SoftCFGError(MISSING_MODEL.format(model=model, hub=HUB_ID)
                         + f"\n({type(exc).__name__}: {reason})") from None
    return net.to(device).eval(), processor


def encode_prompt(processor, prompt: str, device: str):
    """Image-mode prompt ids: the chat template if the processor has one, then <begin_of_image>."""
    text = prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, generation_mode="image", return_tensors="pt")
    return inputs["input_ids"].to(device), inputs["attention_mask"].to(device)


def render(model, input_ids, attention_mask, guidance, seed: int, cache: str):
    """One image per prompt row as uint8 [B, H, W, 3], sampled from `seed`."""
    import torch

    from softcfg_patch.hf import janus_generate_images

    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    tokens = janus_generate_images(model, input_ids, guidance, attention_mask, generator=generator,
                                   cache_implementation=cache)
    with torch.no_grad():
        pixels = model.decode_image_tokens(tokens).float()  # [B, H, W, 3] in [-1, 1]
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def side_by_side(images, gap: int = 8):
    """Paste equally sized HxWx3 arrays left to right on a white strip."""
    from PIL import Image

    height, width = images[0].shape[:2]
    canvas = Image.new("RGB", (len(images) * width + (len(images) - 1) * gap, height), "white")
    for i, image in enumerate(images):
        canvas.paste(Image.fromarray(image), (i * (width + gap), 0))
    return canvas


@exit_on_error()  # bad input: `error: ...` on stderr, exit status 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from softcfg_patch import Guidance

    try:
        import softcfg_patch.hf  # noqa: F401  (needs the optional transformers extra)
    except ImportError as exc:
        raise SoftCFGError(str(exc)) from None

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[args.dtype]
    try:
        common = dict(guidance_scale=args.guidance_scale,
                      guidance_scale_pow=args.guidance_scale_pow,
                      randomize_temperature=args.temperature, step_norm=args.step_norm,
                      softcfg_target=args.softcfg_target)
        cfg, soft = Guidance(**common), Guidance(softcfg_strength=args.softcfg_strength, **common)
    except ValueError as exc:
        raise SoftCFGError(str(exc)) from None
    model, processor = load(args.model, device, dtype)
    input_ids, attention_mask = encode_prompt(processor, args.prompt, device)
    left = render(model, input_ids, attention_mask, cfg, args.seed, args.cache)[0]
    right = render(model, input_ids, attention_mask, soft, args.seed, args.cache)[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side([left, right]).save(out)
    print(f"wrote {out}: CFG (left) vs SoftCFG alpha={args.softcfg_strength} (right), "
          f"guidance {args.guidance_scale}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
