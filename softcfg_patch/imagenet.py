"""What every ImageNet sampler shares: config + CLI, the distributed loop, seeding,
resume, and PNG / npz output. Model-agnostic: an entry point passes a function that
builds its generator and (optionally) one that builds its token->image decoder.

Determinism: sample i has class i mod num_classes. The samples are cut into batches
of `sample.per_proc_batch_size`; batch k is drawn with a generator seeded from
(sample.seed, k) and batches are dealt round-robin to the processes, so the images
depend on the seed and the batch size but not on how many processes ran.

Resume: every PNG (and token file) is written to a temporary name and renamed, so
a file on disk is always complete. `<output_dir>/manifest.json` (manifest.py) records
every setting that changes the images; a rerun resumes only when it matches, skips
batches whose files all exist and fills in only what is missing. `<output_dir>.npz`
(arr_0, labels, manifest) is assembled at the end by streaming the PNGs into the
archive, then renamed into place.

Errors: every input is checked in every process before torch.distributed starts and
before any model is built; the output folder is checked by rank 0, which alone prints.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from . import manifest as mf
from .checkpoint import CheckpointError, html_message, looks_like_html
from .guidance import Guidance
from .sampler import generate

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every option the samplers understand, with its default. A config file adds the
# model tree; the command line may only change keys that exist in the merged result.
SAMPLE_DEFAULTS = {
    "experiment": {"name": "sample", "output_dir": "outputs/sample", "generator_checkpoint": "???"},
    "model": {"generator": {**Guidance().to_dict()}},
    "sample": {
        "num_fid_samples": 50000,   # total images; sample i has class i mod num_classes
        "per_proc_batch_size": 125,  # rows per batch (per process)
        "seed": 0,                   # batch k uses a generator seeded from (seed, k)
        "save_tokens": False,        # also write the token ids (<output_dir>_tokens.npz)
        "tokens_only": False,        # skip decoding: tokens only, no PNG / npz
        "precision": "tf32",         # fp32 | tf32 | bf16 (tf32 like upstream; CPU ignores tf32)
        "compile": False,            # torch.compile the decode step (GPU)
        "device": "auto",            # auto | cpu | cuda
        "overwrite": False,          # delete the samples of another setting in output_dir first
    },
    "wandb": {"enabled": False, "project": "softcfg", "name": ""},
}
PRECISIONS = ("fp32", "tf32", "bf16")

# Upstream config keys that only matter for training. They are dropped when a config is
# read, so `--help` lists only options that change something.
TRAINING_ONLY = ("model.generator.dropout", "model.generator.attn_drop", "model.generator.tok_dropout",
                 "model.generator.class_label_dropout", "model.generator.use_checkpoint",
                 "model.generator.randomness_anneal_start", "model.generator.randomness_anneal_end",
                 "model.generator.seed", "model.vq_model.finetune_decoder")

# One line of --help per option (keys under model.tokenizer share the last entry).
OPTION_HELP = {
    "experiment.name": "run name, used in messages and as the W&B run name default",
    "experiment.output_dir": "folder of the PNGs and manifest.json; the npz is <output_dir>.npz",
    "experiment.generator_checkpoint": "generator weights (.bin/.pth/.safetensors); relative paths: "
                                       "current folder, then repository root",
    "experiment.tokenizer_checkpoint": "AliTok tokenizer weights (AliTok.pth); looked up like the generator",
    "model.vq_model.pretrained_tokenizer_weight": "MaskGIT-VQGAN weights (RAR's tokenizer); looked up "
                                                  "like the generator",
    "model.generator.guidance_scale": "gamma, the final CFG scale; 0 = no guidance (one branch)",
    "model.generator.guidance_scale_pow": "k of the cosine ramp s_t; 0 = constant scale gamma",
    "model.generator.randomize_temperature": "softmax temperature of the guided logits",
    "model.generator.softcfg_strength": "SoftCFG alpha; 0 = plain CFG",
    "model.generator.step_norm": "Step Normalization of the SoftCFG multipliers",
    "model.generator.softcfg_confidence": "sampled (released code) | max (paper text)",
    "model.generator.softcfg_align": "source (released code) | token (paper text)",
    "model.generator.softcfg_min_weight": "floor of the step-normalised multipliers",
    "model.generator.softcfg_target": "cache tensor the multipliers scale: v | k | kv",
    "model.generator.top_k": "keep the k largest guided logits; 0 = off",
    "model.generator.top_p": "nucleus sampling threshold on the guided logits; 1.0 = off",
    "model.generator.cfg_interval": "after this many steps sample the conditional logits alone (LlamaGen)",
    "model.generator.hidden_size": "architecture: width (must match the checkpoint)",
    "model.generator.num_hidden_layers": "architecture: number of blocks (must match the checkpoint)",
    "model.generator.num_attention_heads": "architecture: attention heads (must match the checkpoint)",
    "model.generator.intermediate_size": "architecture: MLP width (must match the checkpoint)",
    "model.generator.image_seq_len": "tokens per image (AliTok 273, RAR 256)",
    "model.generator.condition_num_classes": "number of classes; sample i has class i mod this",
    "model.generator.rope_prefix_len": "architecture: leading 1-D rotary positions (AliTok 17)",
    "model.generator.rope_grid_size": "architecture: side of the 2-D rotary grid (AliTok 16)",
    "model.vq_model.codebook_size": "codebook size V of the generator and its tokenizer",
    "model.vq_model.token_size": "code vector width of the tokenizer",
    "model.vq_model.num_latent_tokens": "tokens per image of the tokenizer (must equal image_seq_len)",
    "sample.num_fid_samples": "number of images; raising it later extends a finished run",
    "sample.per_proc_batch_size": "rows per batch and process (changes the images)",
    "sample.seed": "base seed: batch k uses a generator seeded from (seed, k)",
    "sample.save_tokens": "also write <output_dir>_tokens.npz (tokens, labels, manifest)",
    "sample.tokens_only": "sample tokens only: no decoder, PNGs or image npz",
    "sample.precision": "fp32 | tf32 (like upstream) | bf16 autocast",
    "sample.compile": "torch.compile the fixed-shape decode step once per model and batch shape (CUDA graphs on GPU)",
    "sample.device": "auto | cpu | cuda",
    "sample.overwrite": "delete the samples of another setting in output_dir instead of refusing",
    "wandb.enabled": "log progress to Weights & Biases (pip install wandb)",
    "wandb.project": "W&B project",
    "wandb.name": "W&B run name (empty: W&B picks one)",
    "model.tokenizer.": "architecture of the tokenizer (must match its checkpoint)",
}


class ConfigError(ValueError):
    """A bad config file or command-line option; the message says how to fix it."""


# ----------------------------------------------------------------------------- CLI
def parse_cli(argv: Sequence[str], defaults: dict, prog: str = "sample_imagenet.py",
              check_config: Optional[Callable[[DictConfig, str], None]] = None) -> DictConfig:
    """Config from `--config X` / `config=X` plus `--a.b=c`, `--a.b c` or `a.b=c` overrides.

    check_config(config, config_path) is the entry point's own check (the model family).
    """
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

    config = OmegaConf.merge(OmegaConf.create(defaults),
                             drop_training_only(load_yaml(config_path)) if config_path else {})
    if want_help:
        print(help_text(config, prog, config_path))
        raise SystemExit(0)
    if config_path is None:
        raise ConfigError(f"--config is required: pass the model's config, e.g. {prog} --config "
                          f"configs/<model>.yaml (--help lists every option)")
    known = flat_keys(config)
    for key, value in overrides:
        set_option(config, key, value, known)
    if check_config is not None:
        check_config(config, config_path)
    validate(config)
    return config


def drop_training_only(config: DictConfig) -> DictConfig:
    """Remove the TRAINING_ONLY keys an upstream config may carry."""
    for key in TRAINING_ONLY:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(config, parent)
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    return config


def require_keys(config: DictConfig, keys: Sequence[str], config_path: str, hint: str) -> None:
    """ConfigError naming every missing architecture key of the entry point's model family."""
    missing = [k for k in keys if OmegaConf.select(config, k) is None]
    if missing:
        raise ConfigError(f"config {config_path} lacks {', '.join(missing)}: {hint}")


def resolve_config_path(path: str) -> Path:
    """A relative path is tried from the current folder, then from the repository root."""
    candidates = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (looked in {', '.join(map(str, candidates))}). "
                      f"Pass a path like configs/alitok_xl.yaml")


def load_yaml(path: str) -> DictConfig:
    resolved = resolve_config_path(path)
    try:
        return OmegaConf.load(resolved)
    except Exception as err:
        raise ConfigError(f"could not parse config file {resolved}: {err}") from err


def flat_keys(config: DictConfig) -> dict:
    """{"a.b.c": value} for every leaf."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items():
            name = f"{prefix}{k}"
            if isinstance(v, (DictConfig, dict)):
                walk(v, name + ".")
            else:
                out[name] = v
    walk(config, "")
    return out


def set_option(config: DictConfig, key: str, raw: str, known: dict) -> None:
    if key in TRAINING_ONLY:
        raise ConfigError(f"option '{key}' only matters for training and does nothing when sampling; "
                          f"drop it")
    if key not in known:
        near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else "; run with --help to list every option"
        raise ConfigError(f"unknown option '{key}'{hint}")
    old = known[key]
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    OmegaConf.update(config, key, _coerce(key, value, old, raw), merge=False)


def _coerce(key: str, value, old, raw: str):
    """Keep the type of the default: bool stays bool, numbers stay numbers."""
    if old is None or old == "???":
        return value
    if isinstance(old, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"option '{key}' takes True or False, got {raw!r}")
        return value
    if isinstance(old, (int, float)):
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option '{key}' takes a number, got {raw!r}")
        if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"option '{key}' takes a whole number, got {raw!r}")
            return int(value)
        return float(value) if isinstance(old, float) else value
    if isinstance(old, str):
        return raw
    return value


def _number(value):
    """YAML reads 1e3 as a string; accept it (and 1.0e3, 1_000) as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _whole_number(name: str, value, minimum: int) -> int:
    value = _number(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return value


def validate(config: DictConfig) -> None:
    """Reject impossible settings before any work starts (whole numbers are normalised to int)."""
    try:
        Guidance.from_config(config.model.generator)
    except ValueError as err:
        raise ConfigError(f"model.generator: {err}") from err
    s = config.sample
    for name, minimum in (("num_fid_samples", 1), ("per_proc_batch_size", 1), ("seed", 0)):
        s[name] = _whole_number(f"sample.{name}", s[name], minimum)
    if s.precision not in PRECISIONS:
        raise ConfigError(f"sample.precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"sample.device must be auto, cpu or cuda, got {s.device!r}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sample.device=cuda but no CUDA device is visible; use sample.device=cpu")
    if OmegaConf.is_missing(config.experiment, "generator_checkpoint"):
        raise ConfigError("experiment.generator_checkpoint is required: pass "
                          "--experiment.generator_checkpoint=weights/<model>.bin")
    if not str(config.experiment.output_dir).strip():
        raise ConfigError("experiment.output_dir is empty: pass a folder for the samples, e.g. "
                          "--experiment.output_dir=outputs/<run>")


def help_text(config: DictConfig, prog: str, config_path: Optional[str]) -> str:
    lines = [f"usage: torchrun --nproc_per_node=G {prog} --config configs/<model>.yaml [--key=value ...]",
             "       (the OmegaConf style `config=... key=value` works too)", "",
             "--config is required: the model's yaml (configs/alitok_*.yaml, configs/rar_*.yaml); a relative",
             "path is looked up in the current folder, then in the repository root.", "",
             f"options and their defaults{f' (with {config_path})' if config_path else ' (pass --config to see the model keys)'}:"]
    options = [(f"--{key}={value}", option_help(key)) for key, value in flat_keys(config).items()]
    width = max(len(o) for o, _ in options)
    lines += [f"  {o.ljust(width)}  {h}" for o, h in options]
    return "\n".join(lines)


def option_help(key: str) -> str:
    if key in OPTION_HELP:
        return OPTION_HELP[key]
    prefix = next((p for p in OPTION_HELP if p.endswith(".") and key.startswith(p)), None)
    return OPTION_HELP[prefix] if prefix else "(no description)"


# ------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    """A file the run reads, named by the config key that holds its path."""
    key: str                   # e.g. "experiment.generator_checkpoint"
    what: str                  # e.g. "AliTok generator checkpoint"
    source: str                # where the official file is published
    decoder_only: bool = False  # not needed with sample.tokens_only
    manifest_name: str = "generator"  # its identity keys in the manifest: <name>.sha256, <name>.size


def resolve_input_path(path: str) -> tuple[Optional[Path], list[Path]]:
    """Like --config: a relative path is tried from the current folder, then the repository root."""
    candidates = [Path(path)] if Path(path).is_absolute() else list(dict.fromkeys([Path.cwd() / path,
                                                                                  REPO_ROOT / path]))
    return next((c.resolve() for c in candidates if c.is_file()), None), candidates


def check_inputs(config: DictConfig, inputs: Sequence[InputFile], want_decoder: bool) -> None:
    """Resolve every input path in `config` (in place); one ConfigError listing every problem."""
    problems = []
    for item in inputs:
        if item.decoder_only and not want_decoder:
            continue
        raw = str(OmegaConf.select(config, item.key))
        found, tried = resolve_input_path(raw)
        if found is None:
            problems.append(f"{item.what} '{raw}' not found (tried {', '.join(map(str, tried))}; get it from "
                            f"{item.source} and pass --{item.key}=PATH)")
        elif looks_like_html(found):
            problems.append(html_message(found, item.what, item.source))
        else:
            OmegaConf.update(config, item.key, str(found), merge=False)
    if problems:
        raise ConfigError(f"{len(problems)} input file problem(s), nothing was started: " + "; ".join(problems))


def check_output_folders(out: Path) -> None:
    """output_dir must be (or become) a writable folder, and so must the npz's folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"experiment.output_dir '{out}' is a file, not a folder: pass a folder path "
                          f"(the npz is written next to it as '{out}.npz')")
    for folder, what in ((out, "experiment.output_dir"), (out.parent, "the npz folder (parent of output_dir)")):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{what} '{folder}' cannot be created: '{existing}' is a file")
        try:
            fd, probe = tempfile.mkstemp(prefix=".softcfg-write-check-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(f"{what} '{folder}' is not writable ({err.strerror} in '{existing}'): choose "
                              f"a folder you can write to with --experiment.output_dir=...") from err


# -------------------------------------------------------------------- distributed
def threads_per_process(environ: dict, cpu_count: int) -> Optional[int]:
    """CPU threads for this process, or None to keep OMP_NUM_THREADS (the user's choice).

    Processes sharing a machine split its cores instead of each taking all of them (on a
    busy 2-core machine oversubscribed threads made the tiny sampler several times slower).
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpu_count // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1"))))


def setup_runtime(config: DictConfig) -> tuple[int, int, torch.device]:
    """Start torch.distributed when launched by torchrun; pick the device, precision and threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    threads = threads_per_process(dict(os.environ), len(os.sched_getaffinity(0))
                                  if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if threads is not None:
        torch.set_num_threads(threads)
    use_cuda = config.sample.device == "cuda" or (config.sample.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    tf32 = config.sample.precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return rank, world, device


def is_rank_zero() -> bool:
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_rank_zero(work: Callable[[], object]) -> object:
    """Run `work` on rank 0 only and share its result, or its error, with every rank.

    Other ranks re-raise rank 0's error as a ConfigError without printing it (rank 0 does).
    """
    result, error = None, None
    if is_rank_zero():
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - shared below, then re-raised on rank 0
            error = err
    if dist.is_initialized():
        shared = [result, None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(shared, src=0)
        result, message = shared
        if message is not None and error is None:
            raise ConfigError("(reported by rank 0)")
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------- plan
def batch_plan(num_samples: int, batch_size: int) -> list[range]:
    """Sample index ranges of every batch, the same whatever the world size."""
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def batch_seed(seed: int, batch_index: int) -> int:
    """A distinct 63-bit seed per (seed, batch) pair."""
    return (seed * 1_000_003 + batch_index) % (2 ** 63)


def png_path(out: Path, index: int) -> Path:
    return out / f"{index:06d}.png"


def token_path(out: Path, batch_index: int) -> Path:
    return out / "tokens" / f"batch_{batch_index:06d}.npy"


PNG_END = b"IEND\xaeB`\x82"  # the last 8 bytes of every complete PNG


def png_complete(path: Path) -> bool:
    """True when the PNG exists and ends with its IEND chunk (one seek, no decoding)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:  # missing, or shorter than 8 bytes
        return False


def tokens_complete(path: Path, rows: int) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape[0] == rows
    except (OSError, ValueError):
        return False


def batch_done(out: Path, k: int, indices: range, want_png: bool, want_tokens: bool) -> bool:
    """Every file of batch k is on disk and complete (a truncated file makes the batch run again)."""
    if want_tokens and not tokens_complete(token_path(out, k), len(indices)):
        return False
    return not want_png or all(png_complete(png_path(out, i)) for i in indices)


def class_labels(indices: range, num_classes: int) -> np.ndarray:
    """Sample i has class i mod num_classes."""
    return np.arange(indices.start, indices.stop, dtype=np.int64) % num_classes


# ------------------------------------------------------------------------ manifest
def run_manifest(config: DictConfig, inputs: Sequence[InputFile], want_decoder: bool,
                 device: torch.device) -> dict:
    """The manifest of this run: hashes each input file once (rank 0 only)."""
    s = config.sample
    guidance = Guidance.from_config(config.model.generator).to_dict()
    images = {f"model.generator.{k}": v for k, v in guidance.items()}
    images.update({f"sample.{k}": s[k] for k in ("seed", "per_proc_batch_size", "num_fid_samples", "precision")})
    images["softcfg.version"] = mf.project_version(REPO_ROOT)
    recorded = {}
    for item in inputs:
        if item.decoder_only and not want_decoder:
            continue
        path = str(OmegaConf.select(config, item.key))
        images.update({f"{item.manifest_name}.{k}": v for k, v in mf.file_identity(path).items()})
        recorded[f"{item.manifest_name}.path"] = path
    recorded.update({
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type, "compile": bool(s.compile),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return mf.make_manifest(images, recorded)


def manifest_path(out: Path) -> Path:
    return out / mf.FILENAME


def npz_manifest(npz_path: Path) -> Optional[dict]:
    """The manifest stored in one of our npz files, or None if it has none."""
    try:
        with zipfile.ZipFile(npz_path) as zf:
            if "manifest.npy" not in zf.namelist():
                return None
            with zf.open("manifest.npy") as f:
                return mf.parse(str(np.lib.format.read_array(f)), str(npz_path))
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(f"cannot read the manifest of '{npz_path}' ({err}): move that file away or "
                          f"pass sample.overwrite=True to replace it") from err


def output_files(out: Path) -> list[Path]:
    """Every file a run of ours writes for this output_dir (PNGs, tokens, manifest, npz files)."""
    files = []
    if out.is_dir():
        files += [p for p in out.iterdir() if re.fullmatch(r"\d{6,}\.png|\.\d{6,}\.png\.\d+\.tmp", p.name)]
        files += sorted((out / "tokens").glob("batch_*.npy")) if (out / "tokens").is_dir() else []
        files += [manifest_path(out)] if manifest_path(out).is_file() else []
    files += [p for p in (Path(f"{out}.npz"), Path(f"{out}_tokens.npz")) if p.is_file()]
    return files


def previous_manifest(out: Path) -> Optional[dict]:
    """The manifest of what is already in output_dir (its manifest.json, else an npz's)."""
    if manifest_path(out).is_file():
        try:
            return mf.parse(manifest_path(out).read_text(), str(manifest_path(out)))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{err}: pass sample.overwrite=True to start this output_dir afresh") from err
    for npz in (Path(f"{out}.npz"), Path(f"{out}_tokens.npz")):
        if npz.is_file() and (found := npz_manifest(npz)) is not None:
            return found
    return None


def prepare_output(out: Path, manifest: dict, overwrite: bool) -> tuple[dict, str]:
    """Decide what to do with an existing output_dir, then write the manifest.

    Returns (the manifest written, a note for the log).

    Refuses (ConfigError) when the folder holds samples of other settings; removes them
    first with `overwrite`; regenerates a partial last batch whole when a run is extended.
    """
    existing = output_files(out)
    old = previous_manifest(out) if existing else None
    note = "new run"
    if overwrite and existing:
        for path in existing:
            path.unlink()
        shutil.rmtree(out / "tokens", ignore_errors=True)
        note = f"sample.overwrite=True: removed {len(existing)} files of the previous run"
    elif existing and old is None:
        raise ConfigError(f"output_dir '{out}' holds samples but no manifest (made by an older version?), so "
                          f"their settings are unknown: use another --experiment.output_dir, or pass "
                          f"--sample.overwrite=True to delete them and start again")
    elif old is not None:
        for change in mf.recorded_changes(old, manifest):
            print(f"warning: the environment changed since this output_dir was started ({change}); resuming "
                  f"anyway, but the new samples may differ slightly in floating point", file=sys.stderr)
        kind = mf.verdict(old, manifest)
        if kind == "differ":
            raise ConfigError(f"output_dir '{out}' holds samples made with other settings: "
                              f"{mf.describe_differences(old, manifest)}. Use another --experiment.output_dir, "
                              f"or pass --sample.overwrite=True to delete the old samples")
        if kind == "extend":
            old_n, batch = old["images"]["sample.num_fid_samples"], manifest["images"]["sample.per_proc_batch_size"]
            partial = mf.partial_last_batch(old_n, batch)
            if partial is not None:  # its row count changes, so its draws do: remake it whole
                k, indices = partial
                for path in [png_path(out, i) for i in indices] + [token_path(out, k)]:
                    path.unlink(missing_ok=True)
            note = f"extending from {old_n} to {manifest['images']['sample.num_fid_samples']} samples"
        else:
            note = "resuming"
            manifest = {**manifest, "recorded": {**manifest["recorded"],
                                                 "created": old.get("recorded", {}).get("created")}}
        # A tokens-only rerun must not forget which decoder made the PNGs already here.
        kept = {k: v for k, v in old["images"].items() if k.startswith(mf.DECODER_PREFIX)}
        manifest = {**manifest, "images": dict(sorted({**kept, **manifest["images"]}.items()))}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(manifest_path(out), lambda tmp: tmp.write_text(mf.to_json(manifest)))
    return manifest, note


def check_manifest_unchanged(out: Path, manifest: dict) -> str:
    """Before the npz: the folder still holds this run's samples; returns the manifest text to embed."""
    try:
        text = manifest_path(out).read_text()
        on_disk = mf.parse(text, str(manifest_path(out)))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{manifest_path(out)} vanished or broke while sampling ({err}); "
                          f"rerun the same command to resume") from err
    if mf.verdict(on_disk, manifest) != "resume":
        raise ConfigError(f"another run changed {manifest_path(out)} while this one sampled "
                          f"({mf.describe_differences(on_disk, manifest)}); the npz was not written. "
                          f"Give each run its own --experiment.output_dir")
    return text


# -------------------------------------------------------------------------- output
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if path.suffix == ".npz":  # a killed earlier npz write left a multi-GB temporary: remove it
        from evaluations.npz import remove_stale_temporaries
        remove_stale_temporaries(path)


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_tokens(path: Path, tokens: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), tokens))


def _read_png(path: Path) -> np.ndarray:
    try:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ConfigError(f"{path} is unreadable ({err}): delete it and rerun the same command "
                          f"(its batch is sampled again)") from err


def write_npz_from_pngs(out: Path, num_samples: int, npz_path: Path, labels: Optional[np.ndarray] = None,
                        manifest_text: Optional[str] = None) -> Path:
    """Stream the PNGs into `npz_path` as arr_0 [N, H, W, 3] uint8, one image in memory at a time.

    `labels` (int64 [N]) and `manifest_text` (0-d unicode array) are stored beside arr_0;
    the ADM evaluator reads arr_0 only.
    """
    first = _read_png(png_path(out, 0))
    shape = (num_samples, *first.shape)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in tqdm(range(num_samples), desc=f"writing {npz_path.name}", leave=False):
                    image = _read_png(png_path(out, i))
                    if image.shape != first.shape:
                        raise RuntimeError(f"{png_path(out, i)} has shape {image.shape}, expected {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
            _add_extras(zf, labels, manifest_text)
    atomic_write(npz_path, write)
    return npz_path


def _add_extras(zf: zipfile.ZipFile, labels: Optional[np.ndarray], manifest_text: Optional[str]) -> None:
    if labels is not None:
        with zf.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
    if manifest_text is not None:
        with zf.open("manifest.npy", "w") as member:
            np.lib.format.write_array(member, np.array(manifest_text))


def write_tokens_npz(out: Path, plan: list[range], labels_of: Callable, npz_path: Path,
                     manifest_text: Optional[str] = None) -> Path:
    tokens = np.concatenate([np.load(token_path(out, k)) for k in range(len(plan))])
    labels = np.concatenate([labels_of(r) for r in plan]).astype(np.int64)
    extra = {} if manifest_text is None else {"manifest": np.array(manifest_text)}
    atomic_write(npz_path, lambda tmp: np.savez(open(tmp, "wb"), tokens=tokens, labels=labels, **extra))
    return npz_path


# ---------------------------------------------------------------------------- main
GeneratorBuilder = Callable[[DictConfig, torch.device], torch.nn.Module]
DecoderBuilder = Callable[[DictConfig, torch.device], Callable[[torch.Tensor], torch.Tensor]]


def run_sampling(config: DictConfig, build_generator: GeneratorBuilder,
                 build_decoder: Optional[DecoderBuilder] = None,
                 inputs: Sequence[InputFile] = ()) -> Optional[Path]:
    """Sample `sample.num_fid_samples` images; returns the npz path (rank 0) or None.

    build_decoder(config, device) must return a function mapping tokens [B, N] to
    uint8 images [B, H, W, 3]. `inputs` are checked (and their paths resolved) in every
    process before torch.distributed starts and before any model is built.
    """
    s = config.sample
    out = Path(config.experiment.output_dir)
    want_png = not s.tokens_only
    want_tokens = s.save_tokens or s.tokens_only
    if want_png and build_decoder is None:
        raise ConfigError("this sampler has no image decoder: run with sample.tokens_only=True")
    check_inputs(config, inputs, want_png)
    check_output_folders(out)
    rank, world, device = setup_runtime(config)
    guidance = Guidance.from_config(config.model.generator)

    # Rank 0 hashes the inputs and settles the output folder before any model is built.
    manifest, note = on_rank_zero(
        lambda: prepare_output(out, run_manifest(config, inputs, want_png, device), bool(s.overwrite)))

    model = build_generator(config, device).to(device).eval()
    decode = build_decoder(config, device) if want_png else None

    if rank == 0:
        print(f"sampling {s.num_fid_samples} images into {out} on {world} process(es) ({note}); "
              f"guidance: {guidance}")
    barrier()

    plan = batch_plan(s.num_fid_samples, s.per_proc_batch_size)
    labels_of = lambda r: class_labels(r, model.num_classes)  # noqa: E731
    mine = [k for k in range(rank, len(plan), world)]
    todo = [k for k in mine if not batch_done(out, k, plan[k], want_png, want_tokens)]
    if rank == 0 and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches of this process already on disk")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    logger = _wandb(config) if rank == 0 and config.wandb.enabled else None
    start = time.time()
    for k in tqdm(todo, desc="sampling", disable=rank != 0, unit="batch"):
        labels = torch.from_numpy(labels_of(plan[k])).to(device)
        generator = torch.Generator(device=device).manual_seed(batch_seed(s.seed, k))
        with autocast:
            tokens = generate(model, labels, guidance, generator=generator, compile=s.compile)
        if want_tokens:
            save_tokens(token_path(out, k), tokens.cpu().numpy().astype(np.int32))
        if want_png:
            with autocast, torch.no_grad():
                images = decode(tokens)
            images = images.cpu().numpy() if torch.is_tensor(images) else images
            for i, image in zip(plan[k], images):
                if not png_complete(png_path(out, i)):
                    save_png(png_path(out, i), image)
        if logger is not None:
            logger.log({"batches_done": todo.index(k) + 1, "elapsed_s": time.time() - start})
    barrier()

    def write_outputs() -> Optional[Path]:
        text = check_manifest_unchanged(out, manifest)
        npz = None
        if want_tokens:
            print(f"wrote {write_tokens_npz(out, plan, labels_of, Path(f'{out}_tokens.npz'), text)}")
        if want_png:
            labels = np.concatenate([labels_of(r) for r in plan])
            npz = write_npz_from_pngs(out, s.num_fid_samples, Path(f"{out}.npz"), labels, text)
            print(f"wrote {npz} [{s.num_fid_samples} images]")
        if logger is not None:
            logger.finish()
        return npz

    npz = on_rank_zero(write_outputs)
    return npz if rank == 0 else None


def _wandb(config: DictConfig):
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("wandb.enabled=True but wandb is not installed: pip install wandb") from err
    return wandb.init(project=config.wandb.project, name=config.wandb.name or None,
                      config=OmegaConf.to_container(config, resolve=True))


def main(argv: Sequence[str], defaults: dict, build_generator: GeneratorBuilder,
         build_decoder: Optional[DecoderBuilder] = None, prog: str = "sample_imagenet.py",
         inputs: Sequence[InputFile] = (),
         check_config: Optional[Callable[[DictConfig, str], None]] = None) -> None:
    """Parse, then sample. Bad input exits with status 2 and a one-line `error: ...` on
    stderr, printed by rank 0 only; other ranks exit 2 silently."""
    try:
        config = parse_cli(argv, defaults, prog, check_config)
        run_sampling(config, build_generator, build_decoder, inputs)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        _fail(str(err))
    except OSError as err:  # disk full, permissions changed mid-run ...
        _fail(f"{err}. Finished samples are kept: fix this and rerun the same command to resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _fail(message: str) -> None:
    if is_rank_zero():
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merged_defaults(*extra: dict) -> dict:
    """SAMPLE_DEFAULTS deep-merged with an entry point's own defaults."""
    merged = OmegaConf.merge(OmegaConf.create(SAMPLE_DEFAULTS), *[OmegaConf.create(e) for e in extra])
    return OmegaConf.to_container(merged)
