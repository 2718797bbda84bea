"""What every ImageNet sampler shares: config + CLI, the distributed loop, seeding,
resume, and PNG / npz output. Model-agnostic: an entry point passes a function that
builds its generator and (optionally) one that builds its token->image decoder.

Determinism: sample i has class i mod num_classes. The samples are cut into batches
of `sample.per_proc_batch_size`; batch k is drawn with a generator seeded from
(sample.seed, k) and batches are dealt round-robin to the processes, so the images
depend on the seed and the batch size but not on how many processes ran.

Resume: every PNG (and token file) is written to a temporary name and renamed, so
a file on disk is always complete. A rerun skips batches whose files all exist and
fills in only what is missing. `<output_dir>.npz` is assembled at the end by
streaming the PNGs into the archive, then renamed into place.
"""
from __future__ import annotations

import difflib
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from .checkpoint import CheckpointError
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
    },
    "wandb": {"enabled": False, "project": "softcfg", "name": ""},
}
PRECISIONS = ("fp32", "tf32", "bf16")


class ConfigError(ValueError):
    """A bad config file or command-line option; the message says how to fix it."""


# ----------------------------------------------------------------------------- CLI
def parse_cli(argv: Sequence[str], defaults: dict, prog: str = "sample_imagenet.py") -> DictConfig:
    """Config from `--config X` / `config=X` plus `--a.b=c`, `--a.b c` or `a.b=c` overrides."""
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

    config = OmegaConf.merge(OmegaConf.create(defaults), load_yaml(config_path) if config_path else {})
    if want_help:
        print(help_text(config, prog, config_path))
        raise SystemExit(0)
    known = flat_keys(config)
    for key, value in overrides:
        set_option(config, key, value, known)
    validate(config)
    return config


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


def validate(config: DictConfig) -> None:
    """Reject impossible settings before any work starts."""
    try:
        Guidance.from_config(config.model.generator)
    except ValueError as err:
        raise ConfigError(f"model.generator: {err}") from err
    s = config.sample
    for name in ("num_fid_samples", "per_proc_batch_size"):
        if not isinstance(s[name], int) or s[name] < 1:
            raise ConfigError(f"sample.{name} must be a positive whole number, got {s[name]!r}")
    if s.precision not in PRECISIONS:
        raise ConfigError(f"sample.precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"sample.device must be auto, cpu or cuda, got {s.device!r}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sample.device=cuda but no CUDA device is visible; use sample.device=cpu")
    if OmegaConf.is_missing(config.experiment, "generator_checkpoint"):
        raise ConfigError("experiment.generator_checkpoint is required: pass "
                          "--experiment.generator_checkpoint=weights/<model>.bin")


def help_text(config: DictConfig, prog: str, config_path: Optional[str]) -> str:
    lines = [f"usage: torchrun --nproc_per_node=G {prog} --config configs/<model>.yaml [--key=value ...]",
             "       (the OmegaConf style `config=... key=value` works too)", "",
             f"options and their defaults{f' (with {config_path})' if config_path else ''}:"]
    for key, value in flat_keys(config).items():
        lines.append(f"  --{key}={value}")
    return "\n".join(lines)


# -------------------------------------------------------------------- distributed
def setup_runtime(config: DictConfig) -> tuple[int, int, torch.device]:
    """Start torch.distributed when launched by torchrun; pick the device and precision."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


def batch_done(out: Path, k: int, indices: range, want_png: bool, want_tokens: bool) -> bool:
    if want_tokens and not token_path(out, k).is_file():
        return False
    return not want_png or all(png_path(out, i).is_file() for i in indices)


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


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_tokens(path: Path, tokens: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), tokens))


def write_npz_from_pngs(out: Path, num_samples: int, npz_path: Path) -> Path:
    """Stream the PNGs into `npz_path` as arr_0 [N, H, W, 3] uint8, one image in memory at a time."""
    first = np.asarray(Image.open(png_path(out, 0)).convert("RGB"))
    shape = (num_samples, *first.shape)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in tqdm(range(num_samples), desc=f"writing {npz_path.name}", leave=False):
                    image = np.asarray(Image.open(png_path(out, i)).convert("RGB"), dtype=np.uint8)
                    if image.shape != first.shape:
                        raise RuntimeError(f"{png_path(out, i)} has shape {image.shape}, expected {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
    atomic_write(npz_path, write)
    return npz_path


def write_tokens_npz(out: Path, plan: list[range], labels_of: Callable, npz_path: Path) -> Path:
    tokens = np.concatenate([np.load(token_path(out, k)) for k in range(len(plan))])
    labels = np.concatenate([labels_of(r) for r in plan])
    atomic_write(npz_path, lambda tmp: np.savez(open(tmp, "wb"), tokens=tokens, labels=labels))
    return npz_path


# ---------------------------------------------------------------------------- main
GeneratorBuilder = Callable[[DictConfig, torch.device], torch.nn.Module]
DecoderBuilder = Callable[[DictConfig, torch.device], Callable[[torch.Tensor], torch.Tensor]]


def run_sampling(config: DictConfig, build_generator: GeneratorBuilder,
                 build_decoder: Optional[DecoderBuilder] = None) -> Optional[Path]:
    """Sample `sample.num_fid_samples` images; returns the npz path (rank 0) or None.

    build_decoder(config, device) must return a function mapping tokens [B, N] to
    uint8 images [B, H, W, 3].
    """
    rank, world, device = setup_runtime(config)
    s = config.sample
    guidance = Guidance.from_config(config.model.generator)
    out = Path(config.experiment.output_dir)
    want_png = not s.tokens_only
    want_tokens = s.save_tokens or s.tokens_only

    model = build_generator(config, device).to(device).eval()
    decode = build_decoder(config, device) if want_png else None
    if want_png and decode is None:
        raise ConfigError("this sampler has no image decoder: run with sample.tokens_only=True")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"sampling {s.num_fid_samples} images into {out} on {world} process(es); "
              f"guidance: {guidance}")
    barrier()

    plan = batch_plan(s.num_fid_samples, s.per_proc_batch_size)
    labels_of = lambda r: np.arange(r.start, r.stop) % model.num_classes  # noqa: E731
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
                if not png_path(out, i).is_file():
                    save_png(png_path(out, i), image)
        if logger is not None:
            logger.log({"batches_done": todo.index(k) + 1, "elapsed_s": time.time() - start})
    barrier()

    npz = None
    if rank == 0:
        if want_tokens:
            print(f"wrote {write_tokens_npz(out, plan, labels_of, Path(f'{out}_tokens.npz'))}")
        if want_png:
            npz = write_npz_from_pngs(out, s.num_fid_samples, Path(f"{out}.npz"))
            print(f"wrote {npz} [{s.num_fid_samples} images]")
        if logger is not None:
            logger.finish()
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return npz


def _wandb(config: DictConfig):
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("wandb.enabled=True but wandb is not installed: pip install wandb") from err
    return wandb.init(project=config.wandb.project, name=config.wandb.name or None,
                      config=OmegaConf.to_container(config, resolve=True))


def main(argv: Sequence[str], defaults: dict, build_generator: GeneratorBuilder,
         build_decoder: Optional[DecoderBuilder] = None, prog: str = "sample_imagenet.py") -> None:
    """Parse, then sample; configuration errors exit with status 2 and a one-line reason."""
    try:
        config = parse_cli(argv, defaults, prog)
        run_sampling(config, build_generator, build_decoder)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def merged_defaults(*extra: dict) -> dict:
    """SAMPLE_DEFAULTS deep-merged with an entry point's own defaults."""
    merged = OmegaConf.merge(OmegaConf.create(SAMPLE_DEFAULTS), *[OmegaConf.create(e) for e in extra])
    return OmegaConf.to_container(merged)
