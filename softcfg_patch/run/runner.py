"""The generic sampling runner: every model family samples ImageNet through `main`.

Determinism: the samples are cut into batches of `sample.per_proc_batch_size`; batch k is
drawn with a generator seeded from (sample.seed, k) and batches are dealt round-robin to
the processes, so the images depend on the seed and the batch size but not on how many
processes ran. Sample i has class i mod num_classes (`sample.labels=balanced`), or batch
k draws its classes from a CPU generator of its own (`sample.labels=random`).

Resume: every PNG (and token file) is written to a temporary name and renamed, so a file
on disk is always complete. `<output_dir>/manifest.json` records every setting that
changes the images; a rerun resumes only when it matches, skips batches whose files all
exist and fills in only what is missing. `<output_dir>.npz` (arr_0, labels, manifest) is
assembled at the end by streaming the PNGs into the archive, then renamed into place.

Errors: every input is checked in every process before torch.distributed starts and
before any model is built; the output folder is checked by rank 0, which alone prints.
`main` owns the process: the process group and the TF32 flags live in `runtime()`, a
context manager that restores them; library functions raise SoftCFGError.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..checkpoint import html_message, looks_like_html
from ..errors import ConfigError, SoftCFGError, exit_on_error
from ..guidance import Guidance
from ..precision import cpu_has_fast_bf16, store_linear_weights, tf32
from ..sampler import generate
from . import manifest as mf
from . import output as io
from .config import REPO_ROOT, Sample, find_file, parse_cli
from .registry import Checkpoint, ModelFamily, get


# ------------------------------------------------------------------------- inputs
def check_inputs(config: DictConfig, inputs: Sequence[Checkpoint], want_decoder: bool) -> None:
    """Resolve every input path in `config` (in place); one ConfigError listing every problem."""
    problems = []
    for item in inputs:
        if item.decoder_only and not want_decoder:
            continue
        raw = OmegaConf.select(config, item.key)
        if raw is None or raw == "???":
            problems.append(f"{item.what} is not set (get it from {item.source} and pass --{item.key}=PATH"
                            + (", or sample.tokens_only=True)" if item.decoder_only else ")"))
            continue
        found, tried = find_file(str(raw))  # like --config: the current folder, then the repo root
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


@contextmanager
def runtime(config: DictConfig) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process: starts torch.distributed when launched by
    torchrun, sets the threads and the TF32 flags, and undoes what it set on exit."""
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
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        with tf32(config.sample.precision in ("tf32", "bf16")):
            yield rank, world, device
        if started:
            barrier()  # nobody tears down while a peer still talks to it (gloo aborts the process)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


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


LABEL_STREAM = 2 ** 62  # random labels come from a stream apart from the sampling one


def class_labels(indices: range, num_classes: int, mode: str = "balanced", seed: int = 0,
                 batch_index: int = 0) -> np.ndarray:
    """balanced: sample i has class i mod num_classes. random: uniform classes for batch k,
    drawn (like upstream LlamaGen's torch.randint) from a CPU generator seeded from (seed, k)."""
    if mode == "balanced":
        return np.arange(indices.start, indices.stop, dtype=np.int64) % num_classes
    generator = torch.Generator().manual_seed((batch_seed(seed, batch_index) + LABEL_STREAM) % 2 ** 63)
    return torch.randint(0, num_classes, (len(indices),), generator=generator).numpy().astype(np.int64)


# ------------------------------------------------------------------------ manifest
SAMPLE_FIELDS = frozenset(f.name for f in fields(Sample))  # the options every family shares


def run_manifest(config: DictConfig, inputs: Sequence[Checkpoint], want_decoder: bool,
                 device: torch.device) -> dict:
    """The manifest of this run: hashes each input file once (rank 0 only)."""
    s = config.sample
    guidance = Guidance.from_config(config.model.generator).to_dict()
    images = {f"model.generator.{k}": v for k, v in guidance.items()}
    images.update({f"sample.{k}": s[k] for k in ("seed", "per_proc_batch_size", "num_fid_samples", "precision",
                                                  "labels")})
    # a family's own sample options (ModelFamily.sample, e.g. LlamaGen's image_size_eval) shape its images
    images.update({f"sample.{k}": s[k] for k in s if k not in SAMPLE_FIELDS})
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


# ---------------------------------------------------------------------------- run
def check_run(config: DictConfig, family: ModelFamily) -> None:
    """Every check that needs no process group and no model: inputs and output folders."""
    check_inputs(config, family.checkpoints, want_decoder=not config.sample.tokens_only)
    check_output_folders(Path(config.experiment.output_dir))


def run_sampling(config: DictConfig, family: ModelFamily, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")) -> Optional[Path]:
    """Sample `sample.num_fid_samples` images of `family`; returns the npz path (rank 0) or None.

    Call `check_run(config, family)` first (every process, before torch.distributed starts).
    """
    s = config.sample
    out = Path(config.experiment.output_dir)
    want_png = not s.tokens_only
    want_tokens = s.save_tokens or s.tokens_only
    guidance = Guidance.from_config(config.model.generator)
    inputs = family.checkpoints

    # Rank 0 hashes the inputs and settles the output folder before any model is built.
    manifest, note = on_rank_zero(
        lambda: io.prepare_output(out, run_manifest(config, inputs, want_png, device), bool(s.overwrite)))

    paths = [OmegaConf.select(config, c.key) for c in inputs]  # generator first, then the decoder's (if any)
    model = family.resolve("load_generator")(config, paths[0])
    if s.precision == "bf16":  # the same numbers as casting under autocast, without a cast per step
        store_linear_weights(model, torch.bfloat16)  # before the copy to the device: half the bytes
        if device.type == "cpu" and rank == 0 and not cpu_has_fast_bf16():
            print("warning: sample.precision=bf16 on a CPU without bf16 units (AVX512-BF16/AMX) is "
                  "emulated and slower than fp32; use --sample.precision=fp32", file=sys.stderr)
    model = model.to(device)
    decode = family.resolve("image_decoder")(config, paths[1] if len(paths) > 1 else None, device) if want_png else None
    if rank == 0:
        print(f"sampling {s.num_fid_samples} images into {out} on {world} process(es) ({note}); "
              f"guidance: {guidance}")
    barrier()

    plan = batch_plan(s.num_fid_samples, s.per_proc_batch_size)
    labels_of = lambda k: class_labels(plan[k], model.num_classes, s.labels, s.seed, k)  # noqa: E731
    mine = list(range(rank, len(plan), world))
    todo = [k for k in mine if not io.batch_done(out, k, plan[k], want_png, want_tokens)]
    if rank == 0 and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches of this process already on disk")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    logger = _wandb(config) if rank == 0 and config.wandb.enabled else None
    start = time.time()
    for done, k in enumerate(tqdm(todo, desc="sampling", disable=rank != 0, unit="batch"), 1):
        labels = torch.from_numpy(labels_of(k)).to(device)
        generator = torch.Generator(device=device).manual_seed(batch_seed(s.seed, k))
        with autocast:
            tokens = generate(model, labels, guidance, generator=generator, compile=bool(s.compile))
        if want_tokens:
            io.save_npy(io.token_path(out, k), tokens.cpu().numpy().astype(np.int32))
        if want_png:
            with autocast, torch.no_grad():
                images = decode(tokens)
            images = images.cpu().numpy() if torch.is_tensor(images) else images
            for i, image in zip(plan[k], images):
                if not io.png_complete(io.png_path(out, i)):
                    io.save_png(io.png_path(out, i), image)
        if logger is not None:
            logger.log({"batches_done": done, "elapsed_s": time.time() - start})
    barrier()

    def write_outputs() -> Optional[Path]:
        text = io.check_manifest_unchanged(out, manifest)
        labels = np.concatenate([labels_of(k) for k in range(len(plan))])
        npz = None
        if want_tokens:
            print(f"wrote {io.write_tokens_npz(out, len(plan), labels, Path(f'{out}_tokens.npz'), text)}")
        if want_png:
            npz = io.write_npz_from_pngs(out, s.num_fid_samples, Path(f"{out}.npz"), labels, text)
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


def main(argv: Sequence[str], family: Union[str, ModelFamily], prog: Optional[str] = None) -> None:
    """Parse, then sample. Bad input exits with status 2 and a one-line `error: ...` on
    stderr, printed by rank 0 only; other ranks exit 2 silently."""
    family = get(family) if isinstance(family, str) else family
    with exit_on_error(show=is_rank_zero):
        config = parse_cli(argv, family, prog)
        check_run(config, family)
        with runtime(config) as (rank, world, device):
            try:
                run_sampling(config, family, rank, world, device)
            except OSError as err:  # disk full, permissions changed mid-run ...
                if isinstance(err, SoftCFGError):
                    raise
                raise ConfigError(f"{err}. Finished samples are kept: fix this and rerun the same "
                                  f"command to resume") from err


def entry_point(family: str) -> None:
    """`python <family>/sample_imagenet.py ...`: the whole body of a family's sampler script."""
    main(sys.argv[1:], family)
