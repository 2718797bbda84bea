"""Sample ImageNet 256x256 with RAR and CFG / SoftCFG, for FID evaluation.

    torchrun --nproc_per_node=8 rar/sample_imagenet.py --config configs/rar_xl.yaml \
        --experiment.output_dir=outputs/rar_xl_softcfg \
        --experiment.generator_checkpoint=weights/rar_xl.bin \
        --model.vq_model.pretrained_tokenizer_weight=weights/maskgit-vqgan-imagenet-f16-256.bin \
        --model.generator.softcfg_strength=1

Same CLI, determinism, resume and output as alitok/sample_imagenet.py (both are thin
wrappers over softcfg_patch/imagenet.py); `--help` lists every option.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from softcfg_patch import imagenet  # noqa: E402
from softcfg_patch.checkpoint import load_checkpoint  # noqa: E402

GENERATOR_SOURCE = ("Hugging Face yucornetto/RAR (rar_b.bin, rar_l.bin, rar_xl.bin, rar_xxl.bin; "
                    "see bytedance/1d-tokenizer README_RAR.md)")

DEFAULTS = imagenet.merged_defaults({
    "experiment": {"generator_checkpoint": "weights/rar_xl.bin"},
    "model": {"vq_model": {"pretrained_tokenizer_weight": "weights/maskgit-vqgan-imagenet-f16-256.bin"},
              "tokenizer": {}},  # size overrides for MaskGITVQGAN (empty = the published sizes)
    "sample": {"per_proc_batch_size": 50},
})


def build_generator(config, device):
    from rar.model import RAR
    model = RAR(config)
    return load_checkpoint(model, config.experiment.generator_checkpoint,
                           what=f"RAR generator ({config.experiment.get('name', 'rar')})",
                           source=GENERATOR_SOURCE,
                           architecture=f"hidden {model.num_heads * model.head_dim}, "
                                        f"{model.num_layers} layers")


def build_decoder(config, device):
    from rar.vqgan import load_vqgan, to_uint8_hwc
    vqgan = load_vqgan(config.model.vq_model.pretrained_tokenizer_weight,
                       **dict(config.model.get("tokenizer", {}))).to(device).eval()
    return lambda tokens: to_uint8_hwc(vqgan.decode_tokens(tokens))


if __name__ == "__main__":
    imagenet.main(sys.argv[1:], DEFAULTS, build_generator, build_decoder, prog="rar/sample_imagenet.py")
