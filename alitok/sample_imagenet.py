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

from omegaconf import OmegaConf  # noqa: E402

from softcfg_patch import imagenet  # noqa: E402
from softcfg_patch.checkpoint import load_checkpoint  # noqa: E402

GENERATOR_SOURCE = ("the AliTok release (github.com/ali-vilab/alitok, README 'Download Trained "
                    "Models': alitok_b.bin, alitok_l.bin, alitok_xl.bin)")
TOKENIZER_SOURCE = "the AliTok release (github.com/ali-vilab/alitok, README 'Download Trained Models': AliTok.pth)"
INPUTS = (
    imagenet.InputFile("experiment.generator_checkpoint", "AliTok generator checkpoint", GENERATOR_SOURCE),
    imagenet.InputFile("experiment.tokenizer_checkpoint", "AliTok tokenizer checkpoint", TOKENIZER_SOURCE,
                       decoder_only=True, manifest_name="tokenizer"),
)
ARCHITECTURE_KEYS = ("model.generator.hidden_size", "model.generator.num_hidden_layers",
                     "model.generator.num_attention_heads", "model.generator.image_seq_len",
                     "model.generator.condition_num_classes", "model.vq_model.codebook_size")

DEFAULTS = imagenet.merged_defaults({
    "experiment": {"generator_checkpoint": "weights/alitok_xl.bin",
                   "tokenizer_checkpoint": "weights/AliTok.pth"},
    "model": {"tokenizer": {}},  # size overrides for AliTokTokenizer (empty = the published sizes)
    "sample": {"per_proc_batch_size": 125},
})


def check_config(config, config_path: str) -> None:
    """An AliTok config: RAR's (it has an MLP width) is named as such, not met as a traceback."""
    if OmegaConf.select(config, "model.generator.intermediate_size") is not None:
        raise imagenet.ConfigError(f"{config_path} is a RAR config (it sets model.generator.intermediate_size): "
                                   f"use rar/sample_imagenet.py, or an AliTok config such as configs/alitok_xl.yaml")
    imagenet.require_keys(config, ARCHITECTURE_KEYS, config_path,
                          "pass an AliTok config such as configs/alitok_xl.yaml")
    latent = OmegaConf.select(config, "model.vq_model.num_latent_tokens")
    if latent is not None and latent != config.model.generator.image_seq_len:
        raise imagenet.ConfigError(f"model.vq_model.num_latent_tokens ({latent}) must equal "
                                   f"model.generator.image_seq_len ({config.model.generator.image_seq_len})")


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
    vq = config.model.vq_model  # the codebook the generator samples from, unless model.tokenizer says otherwise
    sizes = {"codebook_size": vq.codebook_size, **({"token_size": vq.token_size} if "token_size" in vq else {}),
             **dict(config.model.get("tokenizer", {}))}
    tokenizer = load_tokenizer(config.experiment.tokenizer_checkpoint, **sizes).to(device).eval()
    return lambda tokens: to_uint8_hwc(tokenizer.decode_tokens(tokens))


if __name__ == "__main__":
    imagenet.main(sys.argv[1:], DEFAULTS, build_generator, build_decoder, prog="alitok/sample_imagenet.py",
                  inputs=INPUTS, check_config=check_config)
