"""The model registry, in the spirit of DiT's `DiT_models`: one entry per model family.

An entry says everything the sampling runner, the table scripts, the benchmark and the
smoke tests need to know about a family, and names its code by lazy import paths
("package.module:function"), so nothing here imports a model family:

    configs/<name>_<size>.yaml     its configs (`sizes`, smallest first, rank table rows)
    <name>/sample_imagenet.py      its entry point: `softcfg_patch.run.entry_point("<name>")`
    load_generator(config, path, source)  -> a softcfg_patch.GuidedModel with the file's weights
    image_decoder(config, path, device, source) -> function: tokens [B, N] -> uint8 images [B, H, W, 3]
                                   (`source`: where the file is published, this entry's text, for errors)

Adding a family = its package, its configs, one `register(ModelFamily(...))` call here
(or in the family's own code, before `entry_point`), and its tests (docs/adding_a_model.md).
This module is plain Python (no torch), so scripts can read it cheaply.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MISSING = "???"  # OmegaConf's marker of a required value


@dataclass(frozen=True)
class Option:
    """One config key of a family's schema: its type, default and --help line."""
    type: Any
    default: Any = MISSING
    help: str = ""


@dataclass(frozen=True)
class Checkpoint:
    """A weights file the run reads, named by the config key that holds its path."""
    key: str                    # e.g. "experiment.generator_checkpoint"
    what: str                   # e.g. "AliTok generator checkpoint"
    source: str                 # where the official files are published (quoted in every error)
    decoder_only: bool = False  # not needed with sample.tokens_only
    manifest_name: str = "generator"  # its identity in the run manifest: <name>.sha256, <name>.size


@dataclass(frozen=True)
class Remote:
    """One official file as published: where, and what it must hash to (softcfg-download).

    host "hf": `location` is a Hugging Face repo id (hf_hub_download; HF_ENDPOINT, HF_TOKEN);
    "gdrive": a Google Drive file id (gdown); "url": a direct HTTPS URL.
    `sha256` is pinned from the publisher's page; "" means trust on first use (the hash of
    the first download is recorded in <dir>/SHA256SUMS and enforced afterwards).
    """
    name: str                   # the file name in --dir (what the configs point at)
    host: str                   # "hf", "gdrive" or "url"
    location: str               # repo id, Drive file id or URL
    sha256: str = ""            # pinned full SHA-256, or "" (unpinned)
    size: int = 0               # bytes, 0 if not published
    sha256_prefix: str = ""     # torch.hub's convention: the hash must start with this
    expected_sha256: str = ""   # a community mirror's hash: a mismatch warns, never refuses
    revision: str = "main"      # Hugging Face revision

    @property
    def page(self) -> str:
        """Where a person downloads it by hand (printed when the automatic way fails)."""
        if self.host == "hf":
            return f"https://huggingface.co/{self.location}/blob/{self.revision}/{self.name}"
        if self.host == "gdrive":
            return f"https://drive.google.com/file/d/{self.location}"
        return self.location


@dataclass(frozen=True)
class ModelFamily:
    name: str                   # "alitok": configs/alitok_<size>.yaml, alitok/sample_imagenet.py
    title: str                  # "AliTok", in messages
    sizes: tuple                # config suffixes, smallest first ("b", "l", "xl")
    generator_class: str        # "alitok.model:ARModel", built as Class(config) (benchmarks: random weights)
    load_generator: str         # "alitok.model:load_generator"
    image_decoder: str          # "alitok.tokenizer:image_decoder"
    generator: dict             # architecture keys of model.generator: {name: Option}
    vq_model: dict              # keys of model.vq_model: {name: Option}
    checkpoints: tuple          # Checkpoint entries, the generator's first
    batch_size: int             # upstream's per-GPU batch (sample.per_proc_batch_size default)
    smoke_config: str           # tiny config (tests/configs/...) for SMOKE runs and CI
    example_config: str         # shown in messages, e.g. configs/alitok_xl.yaml
    sample: dict = field(default_factory=dict)   # family-only sample.* keys: {name: Option}
    tokenizer_sizes: bool = True  # model.tokenizer may override the decoder's sizes
    # Checkpoints the smoke config does not ship: {config key: "module:function"}, function(config)
    # -> a seeded random state dict (SMOKE runs only; their metrics are meaningless anyway).
    smoke_weights: dict = field(default_factory=dict)
    # scripts/sweep.sh's default grid around the known optima: (scales, schedule powers)
    sweep_grid: tuple = ("", "")
    # Published FIDs (upstream README, CFG at the upstream setting) by config name, for the tables.
    reference_fid: dict = field(default_factory=dict)
    # Which guidance_scale means unguided (softcfg_patch.guidance.runs_cfg): the same as the
    # generator class's `unguided_at` (tested), readable without importing the model.
    unguided_at: str = "0"
    # Every official file of the family, for softcfg-download (configs name them by file name).
    downloads: tuple = ()
    # The side of the images it writes: a number, or the config key that holds it (checked
    # against sample.fid_reference before anything runs).
    image_size: Any = 256

    def resolve(self, what: str) -> Callable:
        """The object named by `generator_class` / `load_generator` / `image_decoder` ("module:attribute")."""
        module, _, attribute = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attribute)

    def source(self, key: str) -> str:
        """Where the checkpoint at config `key` is downloaded (the one text every message uses)."""
        return next(c.source for c in self.checkpoints if c.key == key)

    def config_name(self, size: str) -> str:
        return f"{self.name}_{size}"

    @property
    def script(self) -> str:
        return f"{self.name}/sample_imagenet.py"


MODELS: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    MODELS[family.name] = family
    return family


def get(name: str) -> ModelFamily:
    """The family of `name`, a family ("rar") or a config name ("rar_xl", "llamagen_b_256")."""
    for family in sorted(MODELS.values(), key=lambda f: -len(f.name)):
        if name == family.name or name.startswith(family.name + "_"):
            return family
    raise KeyError(f"unknown model '{name}'; known families: {', '.join(MODELS)}")


def model_names() -> list[str]:
    """Every config name of every family (alitok_b, ..., llamagen_3b), in registry and size order."""
    return [f.config_name(size) for f in MODELS.values() for size in f.sizes]


def size_rank(model: str) -> tuple:
    """Sort key of a config name: family in registry order, then its size (unknown last)."""
    try:
        family = get(model)
    except KeyError:
        return (len(MODELS), 0, model)
    size = model[len(family.name) + 1:]
    return (list(MODELS).index(family.name), family.sizes.index(size) if size in family.sizes else 99, model)


def _arch(help: str, type=int, default: Any = MISSING) -> Option:
    return Option(type, default, f"architecture: {help} (must match the checkpoint)")


CODEBOOK = Option(int, MISSING, "codebook size V of the generator and its tokenizer")
TOKEN_SIZE = Option(Optional[int], None, "code vector width of the tokenizer (null: the published one)")
LATENT = Option(Optional[int], None, "tokens per image of the tokenizer (must equal image_seq_len)")
CLASSES = Option(int, 1000, "number of classes")
ALITOK_RAR_GENERATOR = {
    "hidden_size": _arch("width"), "num_hidden_layers": _arch("number of blocks"),
    "num_attention_heads": _arch("attention heads"), "image_seq_len": _arch("tokens per image"),
    "condition_num_classes": CLASSES,
}

register(ModelFamily(
    name="alitok", title="AliTok", sizes=("b", "l", "xl"),
    generator_class="alitok.model:ARModel", load_generator="alitok.model:load_generator", image_decoder="alitok.tokenizer:image_decoder",
    generator={**ALITOK_RAR_GENERATOR,
               "rope_prefix_len": _arch("leading 1-D rotary positions", default=17),
               "rope_grid_size": _arch("side of the 2-D rotary grid", default=16)},
    vq_model={"codebook_size": CODEBOOK, "token_size": TOKEN_SIZE, "num_latent_tokens": LATENT},
    checkpoints=(
        Checkpoint("experiment.generator_checkpoint", "AliTok generator checkpoint",
                   "the AliTok release (github.com/ali-vilab/alitok, README 'Download Trained Models': "
                   "alitok_b.bin, alitok_l.bin, alitok_xl.bin)"),
        Checkpoint("experiment.tokenizer_checkpoint", "AliTok tokenizer checkpoint",
                   "the AliTok release (github.com/ali-vilab/alitok, README 'Download Trained Models': "
                   "the tokenizer weight AliTok.pth, Google Drive "
                   "https://drive.google.com/file/d/1Rir4QEJ_HTvZkhcnw9MTfWlSFemcGVIW)",
                   decoder_only=True, manifest_name="tokenizer")),
    # AliTok publishes only on Google Drive (file ids from the ali-vilab/alitok README); no hashes: unpinned
    downloads=(Remote("alitok_b.bin", "gdrive", "1PNVX9wqePxRjuOKpt4iw6CpIYLlyJWlX"),
               Remote("alitok_l.bin", "gdrive", "1tmwAa724pNY4FgUsLne2VJVGoK_TBuMa"),
               Remote("alitok_xl.bin", "gdrive", "1Vu0UsQfqzZ8HMKFqE2tIGdAcJ6zPXvFd"),
               Remote("AliTok.pth", "gdrive", "1Rir4QEJ_HTvZkhcnw9MTfWlSFemcGVIW")),
    batch_size=125, smoke_config="tests/configs/alitok_tiny.yaml", example_config="configs/alitok_xl.yaml",
    sweep_grid=("7 9 11 13", "1.4 1.5"),  # around the known optima (9/1.5, 13/1.4)
))

register(ModelFamily(
    name="rar", title="RAR", sizes=("b", "l", "xl", "xxl"),
    generator_class="rar.model:RAR", load_generator="rar.model:load_generator", image_decoder="rar.vqgan:image_decoder",
    generator={**ALITOK_RAR_GENERATOR, "intermediate_size": _arch("MLP width")},
    vq_model={"codebook_size": CODEBOOK, "token_size": TOKEN_SIZE, "num_latent_tokens": LATENT,
              "pretrained_tokenizer_weight": Option(str, MISSING, "MaskGIT-VQGAN weights (RAR's tokenizer); "
                                                                  "looked up like the generator")},
    checkpoints=(
        Checkpoint("experiment.generator_checkpoint", "RAR generator checkpoint",
                   "Hugging Face yucornetto/RAR (rar_b.bin, rar_l.bin, rar_xl.bin, rar_xxl.bin; see "
                   "bytedance/1d-tokenizer README_RAR.md)"),
        Checkpoint("model.vq_model.pretrained_tokenizer_weight", "MaskGIT-VQGAN checkpoint",
                   "HuggingFace, repo fun-research/TiTok, file maskgit-vqgan-imagenet-f16-256.bin "
                   "(https://huggingface.co/fun-research/TiTok/blob/main/maskgit-vqgan-imagenet-f16-256.bin; "
                   "the bytedance/1d-tokenizer README_RAR.md fetches it with hf_hub_download)",
                   decoder_only=True, manifest_name="tokenizer")),
    downloads=(  # SHA-256 and sizes from the Hugging Face file pages
        Remote("rar_b.bin", "hf", "yucornetto/RAR",
               "cbbf4b27dc36afae77fdb2fe0d6b9b5b7446eae45f1a9f91d442ab0b315b9ebf", 1043822726),
        Remote("rar_l.bin", "hf", "yucornetto/RAR",
               "edad8e9905e20a5df14eeee0d5d04c1be48b16a7751b4b3f4954a6dec8ad87d5", 1846801542),
        Remote("rar_xl.bin", "hf", "yucornetto/RAR",
               "7b4cec5c76f18dc7a3ea055a6b0cc4c5748c533768eed71564a88d897c762bc8", 3821901843),
        Remote("rar_xxl.bin", "hf", "yucornetto/RAR",
               "85aba44fef7aecfd879829077e541f09da4c29da3b1fd374837601d7322bf6ff", 5994340236),
        Remote("maskgit-vqgan-imagenet-f16-256.bin", "hf", "fun-research/TiTok",
               "424e7f2b11d1d63691ae3fbab74cf6c417ecbe0d8f86187b71f3538c7b56f6d2", 218124077)),
    batch_size=50, smoke_config="tests/configs/rar_tiny.yaml", example_config="configs/rar_xl.yaml",
    sweep_grid=("4.5 6.5 8.5", "1.01 1.5"),  # around RAR-L SoftCFG's 6.5/1.01
))

LLAMAGEN_REPO = "FoundationVision/LlamaGen"
LLAMAGEN_HF = f"the LlamaGen Hugging Face repo https://huggingface.co/{LLAMAGEN_REPO}"
register(ModelFamily(
    name="llamagen", title="LlamaGen", sizes=("b_256", "b", "l_256", "l", "xl", "xxl", "3b"),
    generator_class="llamagen.model:GPT", load_generator="llamagen.model:load_gpt", image_decoder="llamagen.vq:image_decoder",
    generator={
        "dim": _arch("width"), "n_layer": _arch("number of blocks"), "n_head": _arch("attention heads"),
        "n_kv_head": _arch("key/value heads (null = n_head)", Optional[int], None),
        "vocab_size": _arch("codebook size V"), "block_size": _arch("image tokens ((resolution / 16)^2)"),
        "num_classes": CLASSES, "cls_token_num": _arch("class tokens", default=1),
        "multiple_of": _arch("MLP width rounding", default=256),
        "ffn_dim_multiplier": _arch("MLP width multiplier", Optional[float], None),
        "rope_base": _arch("rotary base", float, 10000.0), "norm_eps": _arch("RMSNorm epsilon", float, 1e-5),
        "class_dropout_prob": _arch("> 0: the class table has the 'no class' row CFG needs", float, 0.1)},
    vq_model={"codebook_size": Option(int, 16384, "architecture of VQ-16: codebook size"),
              "codebook_embed_dim": Option(int, 8, "architecture of VQ-16: code width"),
              "encoder_ch_mult": Option(list, (1, 1, 2, 2, 4), "architecture of VQ-16: encoder channels"),
              "decoder_ch_mult": Option(list, (1, 1, 2, 2, 4), "architecture of VQ-16: decoder channels"),
              "z_channels": Option(int, 256, "architecture of VQ-16: latent channels")},
    checkpoints=(
        Checkpoint("experiment.generator_checkpoint", "LlamaGen GPT checkpoint",
                   f"{LLAMAGEN_HF} (c2i_B_256.pt, c2i_B_384.pt, c2i_L_256.pt, c2i_L_384.pt, c2i_XL_384.pt, "
                   f"c2i_XXL_384.pt, c2i_3B_384.pt)"),
        Checkpoint("experiment.tokenizer_checkpoint", "LlamaGen VQ-16 checkpoint",
                   f"{LLAMAGEN_HF} (file vq_ds16_c2i.pt)", decoder_only=True, manifest_name="tokenizer")),
    downloads=(  # SHA-256 and sizes from the Hugging Face file pages (c2i_B_256.pt: not published)
        Remote("c2i_B_256.pt", "hf", LLAMAGEN_REPO),
        Remote("c2i_B_384.pt", "hf", LLAMAGEN_REPO,
               "7ddf3a659b180e4339e4dab8802183ede1ea8f44c5cfd4359ab27bef979c17ad", 443736709),
        Remote("c2i_L_256.pt", "hf", LLAMAGEN_REPO,
               "15fe788b9c0e8dfe36f3e3fd701b44d0c934e4fd94a0ab599b69669aa8f44a55", 1371712314),
        Remote("c2i_L_384.pt", "hf", LLAMAGEN_REPO,
               "9b8cb63634d11e684b4a68017abffff6698752ef715058a77e5e089539ebc39a", 1371860346),
        Remote("c2i_XL_384.pt", "hf", LLAMAGEN_REPO,
               "736cb92bebdcb16737dbd35210a07ae4f7fd001cdfd55b26205d89182d1807ba", 3099048319),
        Remote("c2i_XXL_384.pt", "hf", LLAMAGEN_REPO,
               "cba5a780b9d2394386e7410c630bced3a70e109cf7107e1783c9a986e9e7754e"),
        Remote("c2i_3B_384.pt", "hf", LLAMAGEN_REPO,
               "1e9173ecbe81295b1d80b021b2bf57ed4ef089601b6745336ff20a9f382c4cac", 12386725354),
        Remote("vq_ds16_c2i.pt", "hf", LLAMAGEN_REPO,
               "109aa8afb2cf3761eec23cdc8644154cb498f5ab7eef2a35264d25e5e0499f7d", 287920306)),
    batch_size=32, smoke_config="tests/configs/llamagen_tiny.yaml", example_config="configs/llamagen_xl.yaml",
    sweep_grid=("1.5 1.75 2.0 2.5", "0"),  # constant scales around upstream's 1.65-2.0
    sample={"image_size_eval": Option(int, 256, "side of the saved images: decoded at the model's resolution, "
                                                "then resized (bicubic), as upstream")},
    tokenizer_sizes=False, smoke_weights={"experiment.tokenizer_checkpoint": "llamagen.vq:random_weights"},
    image_size="sample.image_size_eval",
    unguided_at="<=1",
    reference_fid={"llamagen_b_256": 5.46, "llamagen_l": 3.07, "llamagen_xl": 2.62, "llamagen_xxl": 2.34,
                   "llamagen_3b": 2.18},
))


# Files every evaluation needs, named on the softcfg-download command line.
EVALUATION_DOWNLOADS = {
    "reference": Remote(  # not pinned by OpenAI; a community mirror's hash: warn on a mismatch
        "VIRTUAL_imagenet256_labeled.npz", "url",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
        size=2037122530, expected_sha256="b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758"),
    "reference512": Remote(
        "VIRTUAL_imagenet512.npz", "url",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/"
        "VIRTUAL_imagenet512.npz"),
    "inception": Remote(  # torch.hub's convention: the file name carries the hash's first 8 digits
        "pt_inception-2015-12-05-6726825d.pth", "url",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        sha256_prefix="6726825d"),
}


def published(name: str) -> Optional[Remote]:
    """The official file called `name` (a file name in --dir), if the registry knows it."""
    for remote in [r for f in MODELS.values() for r in f.downloads] + list(EVALUATION_DOWNLOADS.values()):
        if remote.name == name:
            return remote
    return None
