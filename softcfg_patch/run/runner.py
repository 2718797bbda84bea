"""The generic sampling runner: every model family samples ImageNet through `main`.

Determinism: the samples are cut into batches of `sample.per_proc_batch_size`; batch k is
drawn with a generator seeded from (sample.seed, k) and batches are dealt round-robin to
the processes, so the images depend on the seed and the batch size but not on how many
processes ran. Sample i has class i mod num_classes (`sample.labels=balanced`), or batch
k draws its classes from a CPU generator of its own (`sample.labels=random`).

Output: every batch leaves one shard (softcfg_patch/shards.py: its indices, labels and
tokens, plus its images with `sample.images=shards`, plus its Inception activations with
`sample.fid_reference`); with `sample.images=png` its images are PNG files as well. At the
end `<output_dir>.npz` (arr_0, labels, manifest) is streamed from the PNGs or the shards
(the same bytes), and `<output_dir>.metrics.json` is scored from the activations.

Resume: every file is written to a temporary name and renamed, so a file on disk is always
complete. `<output_dir>/manifest.json` records every setting that changes the images; a
rerun resumes only when it matches, skips batches whose files all exist and fills in only
what is missing.

One run per folder: rank 0 holds `output_dir/.lock` (lock.py) from before it touches the
folder until the npz is written, and every file that goes into the npz must be one this run
wrote (or one older than the run, resumed).

Errors: every process checks the config and every input before torch.distributed starts
and before any model is built; the processes then agree on one verdict (`agree`), which rank
0 prints, once, before anyone exits. `main` owns the process: SIGINT and SIGTERM become one
line saying how far the run got, the process group and the TF32 flags live in `runtime()`,
a context manager that restores them; library functions raise SoftCFGError.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import abc
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..checkpoint import html_message, looks_like_html
from ..errors import ConfigError, SoftCFGError, exit_on_error, report
from ..files import file_identity
from ..guidance import Guidance, method
from ..precision import cpu_has_fast_bf16, store_linear_weights, tf32
from ..sampler import generate
from ..shards import Layout, save_shard, shard_images, shard_path, token_dtype
from . import evaluation as ev
from . import manifest as mf
from . import output as io
from .config import Sample, _split_args, family_of_config, find_file, parse_cli
from .lock import RunLock
from .registry import Checkpoint, ModelFamily, get, model_names, published

T = TypeVar("T")


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
            problems.append(f"{item.what} '{raw}' not found (tried {', '.join(map(str, tried))}; "
                            f"{download_hint(str(raw), item.source)} and pass --{item.key}=PATH)")
        elif looks_like_html(found):
            problems.append(html_message(found, item.what, item.source))
        else:
            OmegaConf.update(config, item.key, str(found), merge=False)
    if problems:
        raise ConfigError(f"{len(problems)} input file problem(s), nothing was started: " + "; ".join(problems))


def download_hint(path: str, source: str) -> str:
    """How to get a missing file: the exact softcfg-download command for a published one."""
    from ..download import command_for
    command = command_for(path)
    return f"download it with `{command}` (from {source})" if command else f"get it from {source}"


def check_output_folders(out: Path) -> None:
    """output_dir must be (or become) a writable folder, and so must the npz's folder."""
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"experiment.output_dir '{out}' is a broken symbolic link (it points to "
                          f"'{os.readlink(out)}', which does not exist): create that folder, remove the link, "
                          f"or pass another --experiment.output_dir")
    if not out.name:
        raise ConfigError(f"experiment.output_dir '{out}' has no folder name to name the npz after: pass a "
                          f"folder such as outputs/<run>")
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


def rendezvous() -> Optional["dist.Store"]:
    """The launcher's key-value store (torchrun's, or rank 0's), before any process group
    exists; None for a single process. The process group later reuses it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        store, _, _ = next(dist.rendezvous("env://"))
    except (ValueError, RuntimeError) as err:  # a launcher variable missing, the master unreachable
        raise ConfigError(f"cannot reach the other processes of this run ({err}); start it with torchrun "
                          f"or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from err
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
    return dist.PrefixStore(f"softcfg/verdict/{attempt}/", store)


def agree(check: Callable[[], T], store: Optional["dist.Store"]) -> T:
    """Run `check` in every process; if it fails anywhere, rank 0 prints every distinct reason
    once and only then does any process exit (status 2).

    Without the wait, torchrun would stop rank 0 as soon as a faster rank had exited, often
    before rank 0 had printed anything. Reasons seen on some ranks only name those ranks.
    """
    if store is None:
        return check()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result, message = None, ""
    try:
        result = check()
    except SoftCFGError as err:
        message = str(err)
    except Exception as err:  # noqa: BLE001 - a bug: its traceback here, a pointer to it in the verdict
        traceback.print_exc()
        message = f"{type(err).__name__} on rank {rank} (traceback above)"
    store.set(f"rank{rank}", message)
    if rank == 0:
        store.wait([f"rank{r}" for r in range(world)])
        reasons: dict[str, list[int]] = {}
        for r in range(world):
            text = store.get(f"rank{r}").decode()
            if text:
                reasons.setdefault(text, []).append(r)
        for text, ranks in reasons.items():
            who = "" if 0 in ranks or len(ranks) == world else f"rank{'s' if len(ranks) > 1 else ''} " \
                f"{', '.join(map(str, ranks))}: "
            print(f"error: {who}{text}", file=sys.stderr, flush=True)
        store.set("verdict", "fail" if reasons else "ok")
    if store.get("verdict").decode() == "fail":  # blocks until rank 0 has printed
        raise report(ConfigError("the inputs were refused (reported by rank 0)"), printed=True)
    return result


@contextmanager
def runtime(config: DictConfig, store: Optional["dist.Store"] = None) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process: starts torch.distributed when launched by
    torchrun (on `store`, the one `rendezvous` returned), sets the threads and the TF32 flags,
    and undoes what it set on exit."""
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
        backend = "nccl" if use_cuda else "gloo"
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
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


def on_rank_zero(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and share its result, or its error, with every rank.

    Rank 0 prints its error before the others learn of it (and exit), so the reason is always
    printed; the other ranks then exit 2 without printing.
    """
    result, error = None, None
    if is_rank_zero():
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - shared below, then re-raised on rank 0
            error = as_input_error(err)
            if dist.is_initialized():
                if isinstance(error, SoftCFGError):
                    report(error)
                else:
                    traceback.print_exc()
    if dist.is_initialized():
        shared = [result, None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(shared, src=0)
        result, message = shared
        if message is not None and error is None:
            raise report(ConfigError("(reported by rank 0)"), printed=True)
    if error is not None:
        raise error
    return result


def as_input_error(err: Exception) -> Exception:
    """An OSError (disk full, permissions changed mid-run) as the one-line error it deserves."""
    if isinstance(err, OSError) and not isinstance(err, SoftCFGError):
        return ConfigError(f"{err}. Finished samples are kept: fix this and rerun the same command to resume")
    return err


# ---------------------------------------------------------------------------- plan
class BatchPlan(abc.Sequence):
    """The sample index range of every batch, the same whatever the world size; computed on
    demand, so the plan takes no memory whatever N is."""

    def __init__(self, num_samples: int, batch_size: int):
        self.num_samples, self.batch_size = num_samples, batch_size

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} of a plan of {len(self)} batches")
        start = k * self.batch_size
        return range(start, min(start + self.batch_size, self.num_samples))


def batch_plan(num_samples: int, batch_size: int) -> BatchPlan:
    return BatchPlan(num_samples, batch_size)


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


def run_manifest(config: DictConfig, family: ModelFamily, want_decoder: bool, device: torch.device) -> dict:
    """The manifest of this run: hashes each input file once (rank 0 only)."""
    s = config.sample
    guidance = Guidance.from_config(config.model.generator)
    images = {f"model.generator.{k}": v for k, v in guidance.to_dict().items()}
    images.update({f"sample.{k}": s[k] for k in ("seed", "per_proc_batch_size", "num_fid_samples", "precision",
                                                  "labels")})
    # a family's own sample options (ModelFamily.sample, e.g. LlamaGen's image_size_eval) shape its images
    images.update({f"sample.{k}": s[k] for k in s if k not in SAMPLE_FIELDS})
    images["softcfg.version"] = mf.project_version()
    recorded = {"method": method(guidance, family)}  # what runs: noguidance, cfg or softcfg
    for item in family.checkpoints:
        if item.decoder_only and not want_decoder:
            continue
        path = str(OmegaConf.select(config, item.key))
        identity = file_identity(path)
        images.update({f"{item.manifest_name}.{k}": v for k, v in identity.items()})
        recorded[f"{item.manifest_name}.path"] = path
        recorded[f"{item.manifest_name}.pinned"] = pinned_status(path, identity["sha256"])
    recorded.update({
        "family": family.name, "image_size": ev.image_size(config, family), "sample.images": images_kept(config),
        # the whole config: scripts/decode_tokens.py rebuilds the decoder from it
        "config": OmegaConf.to_container(config, resolve=True),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type, "compile": bool(s.compile),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return mf.make_manifest(images, recorded)


def pinned_status(path: str, sha256: str) -> str:
    """Whether a checkpoint is the published file: "match" or "mismatch" against the hash the
    registry pins for its file name, "unpinned" (published without a hash), or "unknown file"."""
    remote = published(Path(path).name)
    if remote is None:
        return "unknown file"
    if not remote.sha256:
        return "unpinned"
    if sha256 != remote.sha256:
        print(f"warning: {path} is not the published {remote.name} (SHA-256 {sha256[:12]}..., published "
              f"{remote.sha256[:12]}...); its samples are not the paper's model's", file=sys.stderr)
        return "mismatch"
    return "match"


# ---------------------------------------------------------------------------- run
def check_run(config: DictConfig, family: ModelFamily) -> None:
    """Every check that needs no process group and no model: inputs, output folders, wandb."""
    # "." and "a/.." name the npz after the folder itself (../name.npz), never "..npz"
    config.experiment.output_dir = os.path.abspath(os.path.expanduser(str(config.experiment.output_dir)))
    check_inputs(config, family.checkpoints, want_decoder=not config.sample.tokens_only)
    check_output_folders(Path(config.experiment.output_dir))
    ev.check_evaluation(config, family)
    if config.wandb.enabled:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ConfigError("wandb.enabled=True but wandb is not installed: pip install wandb") from err


def checked_config(argv: Sequence[str], family: ModelFamily, prog: Optional[str] = None) -> DictConfig:
    config = parse_cli(argv, family, prog)
    check_run(config, family)
    return config


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. Raised wherever the main thread was, so the batch in flight
    is dropped (every file is written atomically: nothing half-written stays)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.progress: Optional[str] = None  # how far the run got, in words (rank 0)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT / SIGTERM raise Interrupted; a second one exits at once (a cleanup that hangs)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    def handle(signum, frame):
        for sig in signals:
            signal.signal(sig, lambda n, f: os._exit(128 + n))
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def out_of_memory(err: BaseException) -> bool:
    """A CUDA OutOfMemoryError, or the CPU allocator's (a RuntimeError) and its kin."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and any(
        text in str(err) for text in ("out of memory", "can't allocate memory", "Cannot allocate memory")))


def images_kept(config: DictConfig) -> str:
    """png, shards or none: how this run keeps its images (tokens_only keeps none)."""
    return "none" if config.sample.tokens_only else str(config.sample.images)


def run_sampling(config: DictConfig, family: ModelFamily, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")) -> Optional[Path]:
    """Sample `sample.num_fid_samples` images of `family`; returns the npz path (rank 0; None
    without one: `sample.images=none`) or None.

    Call `check_run(config, family)` first (every process, before torch.distributed starts).
    """
    s = config.sample
    out = Path(config.experiment.output_dir)
    with ExitStack() as held:
        def claim() -> tuple[dict, str, int]:  # rank 0, before any model is built
            lock = RunLock.acquire(out)  # held until this run's npz is written
            held.callback(lock.release)
            manifest = run_manifest(config, family, not s.tokens_only, device)
            return (*io.prepare_output(out, manifest, bool(s.overwrite)), lock.started_ns)

        manifest, note, started_ns = on_rank_zero(claim)
        plan = batch_plan(s.num_fid_samples, s.per_proc_batch_size)
        evaluation = ev.load(config, device, rank)
        layout = Layout(images_kept(config), evaluation.key if evaluation else "")
        try:
            written, num_classes = sample_batches(config, family, plan, rank, world, device, note, layout,
                                                  evaluation)
            npz = on_rank_zero(lambda: write_outputs(config, plan, num_classes, manifest, written, started_ns,
                                                     layout, evaluation))
            return npz if rank == 0 else None
        except Interrupted as stop:
            if rank == 0:
                stop.progress = f"after {io.batches_on_disk(out, plan, layout)} of {len(plan)} batches"
            raise


def sample_batches(config: DictConfig, family: ModelFamily, plan: BatchPlan, rank: int, world: int,
                   device: torch.device, note: str, layout: Layout = Layout(),
                   evaluation: Optional["ev.Evaluation"] = None) -> tuple[dict, int]:
    """Draw this process's batches that are not on disk yet; returns (the ledgers of every
    process, merged on rank 0 ({} elsewhere): what this run wrote, batch by batch; the number
    of classes)."""
    s = config.sample
    out = Path(config.experiment.output_dir)
    want_images = not s.tokens_only
    guidance = Guidance.from_config(config.model.generator)
    paths = [OmegaConf.select(config, c.key) for c in family.checkpoints]  # generator first, then the decoder's
    sources = [c.source for c in family.checkpoints]
    model = family.resolve("load_generator")(config, paths[0], source=sources[0])
    if s.precision == "bf16":  # the same numbers as casting under autocast, without a cast per step
        store_linear_weights(model, torch.bfloat16)  # before the copy to the device: half the bytes
        if device.type == "cpu" and rank == 0 and not cpu_has_fast_bf16():
            print("warning: sample.precision=bf16 on a CPU without bf16 units (AVX512-BF16/AMX) is "
                  "emulated and slower than fp32; use --sample.precision=fp32", file=sys.stderr)
    model = model.to(device)
    decode = (family.resolve("image_decoder")(config, paths[1] if len(paths) > 1 else None, device,
                                              source=sources[-1]) if want_images else None)
    tokens_as = token_dtype(model.vocab_size)
    if rank == 0:
        print(f"sampling {s.num_fid_samples} images into {out} on {world} process(es) ({note}); "
              f"images: {layout.images}; guidance: {guidance}")
    barrier()

    mine = range(rank, len(plan), world)
    todo = np.fromiter((k for k in mine if not io.batch_done(out, k, plan[k], layout)), np.int64)
    if rank == 0 and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches of this process already on disk")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    logger = _wandb(config) if rank == 0 and config.wandb.enabled else None
    ledger, start = io.Ledger(out), time.time()
    for done, k in enumerate(tqdm(todo.tolist(), desc="sampling", disable=rank != 0, unit="batch"), 1):
        labels = class_labels(plan[k], model.num_classes, s.labels, s.seed, k)
        generator = torch.Generator(device=device).manual_seed(batch_seed(s.seed, k))
        try:
            with autocast:
                tokens = generate(model, torch.from_numpy(labels).to(device), guidance, generator=generator,
                                  compile=bool(s.compile))
                if want_images:
                    with torch.no_grad():
                        images = decode(tokens)
            if evaluation is not None:
                activations = evaluation.activations(images)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ConfigError(f"out of memory drawing a batch of {len(plan[k])} images on {device} "
                              f"(sample.per_proc_batch_size={s.per_proc_batch_size}; {reason}). "
                              f"The {done - 1} batches finished by this process are kept: free memory and rerun "
                              f"the same command to resume, or pass a smaller --sample.per_proc_batch_size "
                              f"(e.g. {max(1, s.per_proc_batch_size // 2)}) with another --experiment.output_dir "
                              f"(the batch size changes the images)") from None
        shard = {"indices": np.arange(plan[k].start, plan[k].stop, dtype=np.int64), "labels": labels,
                 "tokens": tokens.cpu().numpy().astype(tokens_as)}
        files = []
        if want_images:
            images = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
            if layout.images == "shards":
                shard["images"] = images
            elif layout.pngs:
                for i, image in zip(plan[k], images):
                    files.append(io.png_path(out, i))
                    io.save_png(files[-1], image)
        if evaluation is not None:
            shard.update(activations, inception=np.array(evaluation.key))
        save_shard(shard_path(out, k), shard)  # last: a batch counts as done once its shard is there
        ledger.record(k, [shard_path(out, k)] + files)
        if logger is not None:
            logger.log({"batches_done": done, "elapsed_s": time.time() - start})
    if logger is not None:
        logger.finish()
    return gather_ledgers(ledger, world), model.num_classes


def gather_ledgers(ledger: "io.Ledger", world: int) -> dict:
    """Every process's ledger, merged on rank 0 ({} on the others)."""
    if not dist.is_initialized():
        return dict(ledger.batches)
    gathered = [None] * world if is_rank_zero() else None
    dist.gather_object(ledger.batches, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if gathered is not None else {}


def write_outputs(config: DictConfig, plan: BatchPlan, num_classes: int, manifest: dict, written: dict,
                  started_ns: int, layout: Layout = Layout(), evaluation: Optional["ev.Evaluation"] = None
                  ) -> Optional[Path]:
    """Rank 0, once every batch is on disk: check that every file is this run's, then the npz
    files and the metrics."""
    s = config.sample
    out = Path(config.experiment.output_dir)
    text = io.check_manifest_unchanged(out, manifest)
    io.check_ownership(out, plan, written, started_ns, layout)
    labels = np.concatenate([class_labels(plan[k], num_classes, s.labels, s.seed, k) for k in range(len(plan))])
    npz = None
    if s.save_tokens or s.tokens_only:
        print(f"wrote {io.write_tokens_npz(out, len(plan), labels, Path(f'{out}_tokens.npz'), text)}")
    if layout.images != "none":
        npz = Path(f"{out}.npz")
        if io.npz_is_this_run(npz, text, s.num_fid_samples):  # a rerun after the metrics failed
            print(f"kept {npz} [{s.num_fid_samples} images, this run's]")
        else:
            batches = (io.png_images(out, s.num_fid_samples) if layout.pngs else shard_images(out, len(plan)))
            io.write_images_npz(batches, s.num_fid_samples, npz, labels, text)
            print(f"wrote {npz} [{s.num_fid_samples} images]")
    if evaluation is not None:
        evaluation.finish(out, len(plan), s.num_fid_samples)
    return npz


def _wandb(config: DictConfig):
    import wandb  # check_run made sure it is there
    return wandb.init(project=config.wandb.project, name=config.wandb.name or None,
                      config=OmegaConf.to_container(config, resolve=True))


def main(argv: Sequence[str], family: Union[str, ModelFamily], prog: Optional[str] = None) -> None:
    """Parse, check, sample.

    Bad input exits with status 2 and one line `error: ...` on stderr, printed once per run
    (rank 0 prints what every process found); an error met while sampling (out of memory, a
    full disk) is printed by the process that met it. SIGINT and SIGTERM print one line saying
    how far the run got and exit 130 / 143; a rerun of the same command resumes.
    """
    family = get(family) if isinstance(family, str) else family
    try:
        with interruptible(), exit_on_error():
            store = rendezvous()
            config = agree(lambda: checked_config(argv, family, prog), store)
            with runtime(config, store) as (rank, world, device):
                try:
                    run_sampling(config, family, rank, world, device)
                except (OSError, SoftCFGError) as err:
                    raise from_this_rank(as_input_error(err), rank, world) from err
    except Interrupted as stop:
        if is_rank_zero():
            print(f"interrupted {stop.progress or 'before the first batch'}; rerun the same command to resume",
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None


def from_this_rank(err: Exception, rank: int, world: int) -> Exception:
    """A process's own error, named by its rank when several run (each prints its own)."""
    if world == 1 or getattr(err, "reported", False) or not isinstance(err, SoftCFGError):
        return err
    return ConfigError(f"rank {rank}: {err}")


def entry_point(family: str) -> None:
    """`python <family>/sample_imagenet.py ...`: the whole body of a family's sampler script."""
    main(sys.argv[1:], family)


def sample_command(argv: Optional[Sequence[str]] = None) -> None:
    """`softcfg-sample --config CONFIG ...`: a family's sampler, the family read from the config
    (`--config rar_xl` equals `rar/sample_imagenet.py --config configs/rar_xl.yaml`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_error():
        config_path, _, want_help = _split_args(argv)
        if config_path is None:
            names = ", ".join(model_names())
            if want_help:
                print(f"usage: softcfg-sample --config CONFIG [--key=value ...]\n\nCONFIG is a config file or "
                      f"a packaged config name ({names}); --help with --config lists every option.")
                raise SystemExit(0)
            raise ConfigError(f"--config is required: a config file or a packaged config name ({names}), "
                              f"e.g. softcfg-sample --config alitok_xl --help")
        family = family_of_config(config_path)
    main(argv, family, prog="softcfg-sample")

