"""Sample ImageNet 256x256 with AliTok and CFG / SoftCFG, for FID evaluation.

    torchrun --nproc_per_node=8 alitok/sample_imagenet.py --config configs/alitok_xl.yaml \
        --experiment.output_dir=outputs/alitok_xl_softcfg \
        --experiment.generator_checkpoint=weights/alitok_xl.bin \
        --model.generator.guidance_scale=9 --model.generator.guidance_scale_pow=1.5 \
        --model.generator.softcfg_strength=1 --model.generator.step_norm=True

The upstream style (`config=configs/alitok_xl.yaml experiment.output_dir=...`) works
too; `--help` lists every option. Writes one PNG per sample and `<output_dir>.npz`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from softcfg_patch import imagenet  # noqa: E402
from softcfg_patch.checkpoint import load_checkpoint  # noqa: E402

GENERATOR_SOURCE = ("the AliTok release (github.com/ali-vilab/alitok, README 'Download Trained "
                    "Models': alitok_b.bin, alitok_l.bin, alitok_xl.bin)")

DEFAULTS = imagenet.merged_defaults({
    "experiment": {"generator_checkpoint": "weights/alitok_xl.bin",
                   "tokenizer_checkpoint": "weights/AliTok.pth"},
    "model": {"tokenizer": {}},  # size overrides for AliTokTokenizer (empty = the published sizes)
    "sample": {"per_proc_batch_size": 125},
})


def build_generator(config, device):
    from alitok.model import ARModel
    model = ARModel(config)
    return load_checkpoint(model, config.experiment.generator_checkpoint,
                           what=f"AliTok generator ({config.experiment.get('name', 'alitok')})",
                           source=GENERATOR_SOURCE,
                           architecture=f"hidden {model.num_heads * model.head_dim}, "
                                        f"{model.num_layers} layers")


def build_decoder(config, device):
    from alitok.tokenizer import load_tokenizer, to_uint8_hwc
    tokenizer = load_tokenizer(config.experiment.tokenizer_checkpoint,
                               **dict(config.model.get("tokenizer", {}))).to(device).eval()
    return lambda tokens: to_uint8_hwc(tokenizer.decode_tokens(tokens))


if __name__ == "__main__":
    imagenet.main(sys.argv[1:], DEFAULTS, build_generator, build_decoder, prog="alitok/sample_imagenet.py")
