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

from omegaconf import OmegaConf  # noqa: E402

from softcfg_patch import imagenet  # noqa: E402
from softcfg_patch.checkpoint import load_checkpoint  # noqa: E402

GENERATOR_SOURCE = ("Hugging Face yucornetto/RAR (rar_b.bin, rar_l.bin, rar_xl.bin, rar_xxl.bin; "
                    "see bytedance/1d-tokenizer README_RAR.md)")
TOKENIZER_SOURCE = "Hugging Face fun-research/TiTok (maskgit-vqgan-imagenet-f16-256.bin)"
INPUTS = (
    imagenet.InputFile("experiment.generator_checkpoint", "RAR generator checkpoint", GENERATOR_SOURCE),
    imagenet.InputFile("model.vq_model.pretrained_tokenizer_weight", "MaskGIT-VQGAN checkpoint",
                       TOKENIZER_SOURCE, decoder_only=True, manifest_name="tokenizer"),
)
ARCHITECTURE_KEYS = ("model.generator.hidden_size", "model.generator.num_hidden_layers",
                     "model.generator.num_attention_heads", "model.generator.intermediate_size",
                     "model.generator.image_seq_len", "model.generator.condition_num_classes",
                     "model.vq_model.codebook_size")

DEFAULTS = imagenet.merged_defaults({
    "experiment": {"generator_checkpoint": "weights/rar_xl.bin"},
    "model": {"vq_model": {"pretrained_tokenizer_weight": "weights/maskgit-vqgan-imagenet-f16-256.bin"},
              "tokenizer": {}},  # size overrides for MaskGITVQGAN (empty = the published sizes)
    "sample": {"per_proc_batch_size": 50},
})


def check_config(config, config_path: str) -> None:
    """A RAR config: AliTok's (no MLP width, a tokenizer_checkpoint) is named as such."""
    if OmegaConf.select(config, "experiment.tokenizer_checkpoint") is not None or (
            OmegaConf.select(config, "model.generator.intermediate_size") is None
            and OmegaConf.select(config, "model.generator.hidden_size") is not None):
        raise imagenet.ConfigError(f"{config_path} is an AliTok config (it has no model.generator."
                                   f"intermediate_size): use alitok/sample_imagenet.py, or a RAR config "
                                   f"such as configs/rar_xl.yaml")
    imagenet.require_keys(config, ARCHITECTURE_KEYS, config_path, "pass a RAR config such as configs/rar_xl.yaml")
    latent = OmegaConf.select(config, "model.vq_model.num_latent_tokens")
    if latent is not None and latent != config.model.generator.image_seq_len:
        raise imagenet.ConfigError(f"model.vq_model.num_latent_tokens ({latent}) must equal "
                                   f"model.generator.image_seq_len ({config.model.generator.image_seq_len})")


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
    vq = config.model.vq_model  # the codebook the generator samples from, unless model.tokenizer says otherwise
    sizes = {"num_embeddings": vq.codebook_size, **({"embedding_dim": vq.token_size} if "token_size" in vq else {}),
             **dict(config.model.get("tokenizer", {}))}
    vqgan = load_vqgan(vq.pretrained_tokenizer_weight, **sizes).to(device).eval()
    return lambda tokens: to_uint8_hwc(vqgan.decode_tokens(tokens))


if __name__ == "__main__":
    imagenet.main(sys.argv[1:], DEFAULTS, build_generator, build_decoder, prog="rar/sample_imagenet.py",
                  inputs=INPUTS, check_config=check_config)
