"""The run config: an OmegaConf structured schema per model family, the command line, --help.

The schema is built from dataclasses: the options every run has (experiment, sample,
wandb, below), the guidance settings (the fields of `softcfg_patch.Guidance` and their
`help` metadata) and the family's architecture keys (its registry entry).
OmegaConf rejects unknown keys and wrong types; this module turns its errors into one
line that says how to fix them (with the nearest key for a typo).

    config = parse_cli(["--config", "configs/alitok_xl.yaml", "--sample.seed=3"], "alitok")
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

from ..errors import ConfigError
from ..guidance import Guidance
from . import registry
from .registry import ModelFamily

REPO_ROOT = Path(__file__).resolve().parents[2]
# The configs shipped with the package: in a checkout a link to the repository's configs/,
# in a wheel the files themselves. `--config alitok_xl` and `configs/alitok_xl.yaml` find them
# from any folder.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRECISIONS = ("fp32", "tf32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LABELS = ("balanced", "random")
SEED_LIMIT = 2 ** 63
MAX_SAMPLES = 10 ** 8  # 2000 times ADM's 50,000; beyond it a typo, not a plan

# Upstream config keys that only matter for training. They are dropped when a config is
# read, so `--help` lists only options that change something.
TRAINING_ONLY = ("model.generator.dropout", "model.generator.attn_drop", "model.generator.tok_dropout",
                 "model.generator.class_label_dropout", "model.generator.use_checkpoint",
                 "model.generator.randomness_anneal_start", "model.generator.randomness_anneal_end",
                 "model.generator.seed", "model.vq_model.finetune_decoder")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Experiment:
    name: str = _opt("sample", "run name, used in messages and as the W&B run name default")
    output_dir: str = _opt("outputs/sample", "folder of the PNGs and manifest.json; the npz is <output_dir>.npz")
    generator_checkpoint: str = _opt(MISSING, "generator weights (.bin/.pt/.pth/.safetensors); relative "
                                              "paths: current folder, then repository root")


@dataclass
class Sample:
    num_fid_samples: int = _opt(50000, "number of images; raising it later extends a finished run")
    per_proc_batch_size: int = _opt(125, "rows per batch and process (changes the images)")
    seed: int = _opt(0, "base seed: batch k uses a generator seeded from (seed, k)")
    labels: str = _opt("balanced", "balanced: sample i has class i mod num_classes | random: uniform "
                                   "classes drawn from (seed, k), like upstream LlamaGen's torch.randint")
    images: str = _opt("png", "how the images are kept: png (a file each, then <output_dir>.npz) | shards "
                              "(one npz per batch, then <output_dir>.npz) | none (not kept: needs fid_reference)")
    fid_reference: str = _opt("", "reference batch npz: evaluate while sampling (Inception activations stored "
                                  "per batch, ADM metrics in <output_dir>.metrics.json)")
    inception_weights: str = _opt("", "FID Inception weights for fid_reference (empty: the evaluator's lookup)")
    bootstrap: int = _opt(0, "with fid_reference: bootstrap resamples of each metric's 95% interval (0: off)")
    fid_method: str = _opt("sqrtm", "with fid_reference: sqrtm (ADM's) | eigh (the same trace, faster on CPU)")
    save_tokens: bool = _opt(False, "also write <output_dir>_tokens.npz (tokens, labels, manifest)")
    tokens_only: bool = _opt(False, "sample tokens only: no decoder, no images (rebuild them with "
                                    "scripts/decode_tokens.py)")
    precision: str = _opt("tf32", "fp32 | tf32 (like upstream; CPU ignores it) | bf16 (autocast; the "
                               "generator's linear weights stored in bf16)")
    compile: bool = _opt(False, "torch.compile the decode step (experimental)")
    device: str = _opt("auto", "auto | cpu | cuda")
    overwrite: bool = _opt(False, "delete the samples of another setting in output_dir instead of refusing")


@dataclass
class Wandb:
    enabled: bool = _opt(False, "log progress to Weights & Biases (pip install wandb)")
    project: str = _opt("softcfg", "W&B project")
    name: str = _opt("", "W&B run name (empty: W&B picks one)")


def _field(name: str, type_: Any, default: Any, help: str) -> tuple:
    if type_ is list:
        type_ = List[Any]
    if isinstance(default, (list, tuple)):
        return name, type_, field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return name, type_, field(default=default, metadata={"help": help})


def schema(family: ModelFamily) -> type:
    """The dataclass of a full run config of `family`."""
    guidance = [_field(f.name, f.type if not isinstance(f.type, str) else type(f.default), f.default,
                       f.metadata["help"]) for f in fields(Guidance)]
    arch = [_field(n, o.type, o.default, o.help) for n, o in family.generator.items()]
    generator = make_dataclass(f"{family.title}Generator", arch + guidance)
    vq_model = make_dataclass(f"{family.title}VQ", [_field(n, o.type, o.default, o.help)
                                                   for n, o in family.vq_model.items()])
    model = [("generator", generator, field(default_factory=generator)),
             ("vq_model", vq_model, field(default_factory=vq_model))]
    if family.tokenizer_sizes:
        model.append(("tokenizer", Dict[str, Any], field(default_factory=dict, metadata={
            "help": "architecture of the tokenizer (must match its checkpoint; empty: the published sizes)"})))
    extra_inputs = [_field(c.key.split(".")[-1], str, MISSING, f"{c.what}; looked up like the generator")
                    for c in family.checkpoints if c.key.startswith("experiment.") and
                    c.key != "experiment.generator_checkpoint"]
    experiment = make_dataclass(f"{family.title}Experiment", extra_inputs, bases=(Experiment,))
    sample = make_dataclass(f"{family.title}Sample", [
        _field("per_proc_batch_size", int, family.batch_size, "rows per batch and process (changes the images)"),
        *[_field(n, o.type, o.default, o.help) for n, o in family.sample.items()]], bases=(Sample,))
    model_cls = make_dataclass(f"{family.title}Model", model)
    return make_dataclass(f"{family.title}Run", [
        ("experiment", experiment, field(default_factory=experiment)),
        ("model", model_cls, field(default_factory=model_cls)),
        ("sample", sample, field(default_factory=sample)),
        ("wandb", Wandb, field(default_factory=Wandb))])


def option_help(cls: type, prefix: str = "") -> dict:
    """{dotted key: help} of every field of a schema dataclass."""
    out = {}
    for f in fields(cls):
        if is_dataclass(f.type):
            out.update(option_help(f.type, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata.get("help", "")
    return out


# ----------------------------------------------------------------------------- CLI
def parse_cli(argv: Sequence[str], family: Union[str, ModelFamily], prog: Optional[str] = None) -> DictConfig:
    """Config from `--config X` / `config=X` plus `--a.b=c`, `--a.b c` or `a.b=c` overrides."""
    family = registry.get(family) if isinstance(family, str) else family
    prog = prog or family.script
    config_path, overrides, want_help = _split_args(argv)
    cls = schema(family)
    config = OmegaConf.structured(cls)
    if config_path is not None:
        config = merge_file(config, family, config_path)
    if want_help:
        print(help_text(config, cls, prog, config_path))
        raise SystemExit(0)
    if config_path is None:
        raise ConfigError(f"--config is required: pass the model's config, e.g. {prog} --config "
                          f"{family.example_config} (--help lists every option)")
    for key, value in overrides:
        set_option(config, key, value)
    validate(config)
    return config


def _split_args(argv: Sequence[str]) -> tuple:
    config_path, overrides, want_help = None, [], False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            want_help = True
            continue
        key, sep, value = arg.lstrip("-").partition("=")
        if not sep:
            if not arg.startswith("--") or not args:
                raise ConfigError(f"cannot parse argument {arg!r}: use key=value or --key=value")
            value = args.pop(0)
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
    return config_path, overrides, want_help


def find_file(path: str) -> tuple[Optional[Path], list[Path]]:
    """(the file, or None; the places tried): a relative path is tried from the current
    folder, then from the repository root. Every input path (configs, checkpoints) is found so."""
    candidates = [Path(path)] if Path(path).is_absolute() else list(dict.fromkeys([Path.cwd() / path,
                                                                                  REPO_ROOT / path]))
    return next((c.resolve() for c in candidates if c.is_file()), None), candidates


def resolve_config_path(path: str) -> Path:
    """A relative path is tried from the current folder, then from the repository root;
    `configs/<name>.yaml` and a bare name such as `alitok_xl` also find the packaged config."""
    found, candidates = find_file(path)
    packaged = packaged_config(path)
    if found is None and packaged is not None:
        candidates.append(packaged)
        found = packaged.resolve() if packaged.is_file() else None
    if found is not None:
        return found
    raise ConfigError(f"config file not found: {path} (looked in {', '.join(map(str, candidates))}). "
                      f"Pass a path like configs/alitok_xl.yaml, or a name such as alitok_xl")


def packaged_config(path: str) -> Optional[Path]:
    """Where `configs/<name>.yaml`, `<name>.yaml` or `<name>` would sit among the packaged configs."""
    relative = Path(path)
    if relative.is_absolute():
        return None
    parts = relative.parts[1:] if relative.parts[:1] == ("configs",) else relative.parts
    if len(parts) != 1:
        return None
    name = parts[0] if parts[0].endswith((".yaml", ".yml")) else f"{parts[0]}.yaml"
    return CONFIG_DIR / name


def family_of_config(path: str) -> ModelFamily:
    """The model family a config file belongs to: its file name when that is a registered
    config name (alitok_xl.yaml), else the one family whose architecture keys it fits."""
    resolved = resolve_config_path(path)
    try:
        return registry.get(resolved.stem)
    except KeyError:
        pass
    keys = set(OmegaConf.select(load_yaml(path), "model.generator") or {})
    fitting = [family for family in registry.MODELS.values() if _fits(keys, family)]
    if len(fitting) != 1:
        raise ConfigError(f"cannot tell the model family of {path}: its model.generator keys fit "
                          f"{' and '.join(f.title for f in fitting) or 'no registered family'}; run the family's "
                          f"own sampler, e.g. {next(iter(registry.MODELS.values())).script}")
    return fitting[0]


def load_yaml(path: str) -> DictConfig:
    """A config file with the TRAINING_ONLY keys dropped."""
    resolved = resolve_config_path(path)
    try:
        config = OmegaConf.load(resolved)
    except Exception as err:
        raise ConfigError(f"could not parse config file {resolved}: {err}") from err
    for key in TRAINING_ONLY:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(config, parent)
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    return config


def merge_file(config: DictConfig, family: ModelFamily, path: str) -> DictConfig:
    """The schema's defaults overlaid with the file at `path`, type-checked by OmegaConf."""
    loaded = load_yaml(path)
    check_family(loaded, family, path)
    for key, value in flat_keys(loaded).items():  # 1e3 is the number 1000, not the string "1e3"
        node = _node(config, key)
        if node is not None and not isinstance(value, (DictConfig, ListConfig)):
            OmegaConf.update(loaded, key, _coerce(key, value, str(value), node, f"config {path}: "), merge=False)
    try:
        merged = OmegaConf.merge(config, loaded)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config {path}: {_library_error(err, config)}") from None
    missing = [k for k, v in flat_keys(merged).items() if v == MISSING and k.startswith("model.")]
    if missing:
        raise ConfigError(f"config {path} lacks {', '.join(missing)}: pass a {family.title} config such as "
                          f"{family.example_config}")
    return merged


def check_family(loaded: DictConfig, family: ModelFamily, path: str) -> None:
    """A config of another family is named as such, not met as a list of unknown keys."""
    keys = set(OmegaConf.select(loaded, "model.generator") or {})
    if not keys or _fits(keys, family):
        return
    for other in registry.MODELS.values():
        if other is not family and _fits(keys, other):
            lacks = sorted(_required(family) - keys)
            reason = (f"it has no model.generator.{lacks[0]}" if lacks else
                      "it sets " + ", ".join(f"model.generator.{k}" for k in sorted(keys - _known(family))))
            raise ConfigError(f"{path} is {_a(other.title)} config ({reason}): use {other.script}, or "
                              f"{_a(family.title)} config such as {family.example_config}")


def _known(family: ModelFamily) -> set:
    return set(family.generator) | {f.name for f in fields(Guidance)}


def _required(family: ModelFamily) -> set:
    return {k for k, o in family.generator.items() if o.default == MISSING}


def _fits(keys: set, family: ModelFamily) -> bool:
    return keys <= _known(family) and _required(family) <= keys


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "AEIOU" else f"a {word}"


def flat_keys(config: DictConfig) -> dict:
    """{"a.b.c": value} for every leaf (lists are leaves)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items_ex(resolve=False):
            if isinstance(v, DictConfig):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(config, "")
    return out


def _node(config: DictConfig, key: str):
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key) if parent_key else config
    if not isinstance(parent, DictConfig):
        return None
    try:  # `leaf in parent` is False for a required value not set yet (???)
        return parent._get_node(leaf, throw_on_missing_key=False)
    except OmegaConfBaseException:
        return None


def set_option(config: DictConfig, key: str, raw: str) -> None:
    if key in TRAINING_ONLY:
        raise ConfigError(f"option '{key}' only matters for training and does nothing when sampling; drop it")
    node = _node(config, key)
    if node is None or isinstance(node, DictConfig):
        known = list(flat_keys(config))
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else "; run with --help to list every option"
        raise ConfigError(f"unknown option '{key}'{hint}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    try:
        OmegaConf.update(config, key, _coerce(key, value, raw, node), merge=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"option '{key}': {_library_error(err, config)}") from None


def _coerce(key: str, value: Any, raw: str, node, where: str = "") -> Any:
    """The value as the schema's type: bool stays bool, 1e3 is the whole number 1000."""
    if value is None and node._is_optional():
        return None
    if isinstance(node, BooleanNode):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}option '{key}' takes True or False, got {raw!r}")
        return value
    if isinstance(node, (IntegerNode, FloatNode)):
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}option '{key}' takes a number, got {raw!r}")
        if isinstance(node, IntegerNode):
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{where}option '{key}' takes a whole number, got {raw!r}")
            return int(value)
        return float(value)
    if isinstance(node, StringNode):
        return raw if isinstance(value, (str, int, float, bool)) else value
    return value


def _number(value: Any) -> Any:
    """YAML reads 1e3 as a string; accept it (and 1.0e3, 1_000) as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _library_error(err: OmegaConfBaseException, config: DictConfig) -> str:
    """OmegaConf's first line, plus the nearest known key for an unknown one."""
    message = str(err).strip().splitlines()[0]
    full_key = getattr(err, "full_key", None)
    if "not in" in message and full_key:
        near = difflib.get_close_matches(full_key, list(flat_keys(config)), n=1, cutoff=0.5)
        return f"unknown key '{full_key}'" + (f"; did you mean '{near[0]}'?" if near else "")
    return f"{full_key}: {message}" if full_key else message


def validate(config: DictConfig) -> None:
    """Reject impossible settings before any work starts."""
    try:
        Guidance.from_config(config.model.generator)
    except ValueError as err:
        raise ConfigError(f"model.generator: {err}") from err
    s = config.sample
    for name, minimum in (("num_fid_samples", 1), ("per_proc_batch_size", 1), ("seed", 0)):
        if s[name] < minimum:
            what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
            raise ConfigError(f"sample.{name} must be {what}, got {s[name]!r}")
    if s.seed >= SEED_LIMIT:  # the per-batch seeds are taken mod 2^63: a larger seed repeats a smaller one
        raise ConfigError(f"sample.seed must be below 2^63 = {SEED_LIMIT}, got {s.seed}")
    if s.num_fid_samples > MAX_SAMPLES:
        raise ConfigError(f"sample.num_fid_samples={s.num_fid_samples} is more than this sampler takes "
                          f"({MAX_SAMPLES:,} at most; ADM results use 50,000): check the number")
    from ..shards import IMAGE_MODES  # numpy: not at import (softcfg-download reads this module)
    for name, choices in (("precision", PRECISIONS), ("device", DEVICES), ("labels", LABELS),
                          ("images", IMAGE_MODES)):
        if s[name] not in choices:
            raise ConfigError(f"sample.{name} must be one of {', '.join(choices)}, got {s[name]!r}")
    if s.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("sample.device=cuda but no CUDA device is visible; use sample.device=cpu")
    if OmegaConf.is_missing(config.experiment, "generator_checkpoint"):
        raise ConfigError("experiment.generator_checkpoint is required: pass "
                          "--experiment.generator_checkpoint=weights/<model>.bin")
    if not str(config.experiment.output_dir).strip():
        raise ConfigError("experiment.output_dir is empty: pass a folder for the samples, e.g. "
                          "--experiment.output_dir=outputs/<run>")


def help_text(config: DictConfig, cls: type, prog: str, config_path: Optional[str]) -> str:
    helps = option_help(cls)
    launcher = "torchrun --nproc_per_node=G" + ("" if prog.endswith(".py") else " --no-python")  # a command, not a script
    lines = [f"usage: {launcher} {prog} --config configs/<model>.yaml [--key=value ...]",
             "       (the OmegaConf style `config=... key=value` works too)", "",
             "--config is required: the model's yaml (configs/<family>_<size>.yaml); a relative",
             "path is looked up in the current folder, then in the repository root; a name such",
             "as alitok_xl finds the packaged config.", "",
             f"options and their defaults{f' (with {config_path})' if config_path else ''}:"]
    options = []
    for key, value in flat_keys(config).items():
        parent = key.rpartition(".")[0]
        text = helps.get(key) or helps.get(parent) or "(no description)"
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        options.append((f"--{key}={shown}", text))
    width = max(len(o) for o, _ in options)
    lines += [f"  {o.ljust(width)}  {h}" for o, h in options]
    return "\n".join(lines)
