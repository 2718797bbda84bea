"""ADM evaluator in PyTorch: FID, sFID, Inception Score, precision and recall of an npz sample batch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json out.json]

Prints the same progress and result lines, in the same order, as openai/guided-diffusion's
`evaluations/evaluator.py` (TensorFlow), e.g.

    Inception Score: 215.8370361328125
    FID: 3.9425574129223264
    sFID: 6.140433703346162
    Precision: 0.8265
    Recall: 0.5309

`--bootstrap 100` then adds `FID: 1.2711 ± 0.0123 (95% CI 1.2502-1.2960)`-style lines (bootstrap
std over resampled samples; interval = value +- 1.96 std). Both files are CRC-checked in the
single pass that hashes them, before anything is scored; activations are cached next to each
file, keyed by its hash. Errors (bad or corrupt files, missing weights, broken features) exit
with status 2, a one-line reason on stderr and no result lines. See `--help` for the options.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

if not __package__:  # run as a script: make `evaluations` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import scipy
import torch
from tqdm import tqdm

from evaluations import metrics
from evaluations.inception import NORMALIZE_MODES, RESIZE_MODES, WEIGHTS_ENV, FIDInception, find_weights
from evaluations.npz import BatchFileError, NpzImages, file_sha256, verified_sha256
from evaluations.run_folder import RunFolder, is_run_folder
from softcfg_patch.errors import ConfigError, SoftCFGError
from softcfg_patch.files import atomic_write, save_npz

CACHE_VERSION = 1
PUBLISHED_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's check: the file's SHA-256 starts with it
MIN_UNBIASED_SAMPLES = 10_000
BOOTSTRAP_LINES = (("Inception Score", "inception_score", 2), ("FID", "fid", 4), ("sFID", "sfid", 4),
                   ("Precision", "precision", 4), ("Recall", "recall", 4))
RESULT_LINES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                ("Precision", "precision"), ("Recall", "recall"))
MIN_IMAGES = 4  # k + 1 for the k=3 manifold radii


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluations/evaluator.py",
        description="FID, sFID, Inception Score, precision and recall exactly as the ADM evaluator "
                    "(openai/guided-diffusion), in PyTorch.")
    p.add_argument("ref_batch", help="reference batch .npz (arr_0 images; optional mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample_batch", help="sample batch .npz (arr_0: uint8 [N, H, W, 3]), or a sampler's output_dir "
                                        "(its stored activations, else its npz)")
    p.add_argument("--json", metavar="PATH", help="also write the five metrics and the settings used to PATH")
    add_common_args(p)
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also report each metric's bootstrap std and 95%% interval (value +- 1.96 std) from N "
                        "resamples of the samples (>= 10; 100 is plenty); default 0 = off")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--bootstrap-precision-recall", action="store_true",
                   help="bootstrap precision and recall too (one k-NN search per resample: slow)")
    p.add_argument("--fid-method", choices=metrics.FID_METHODS, default="sqrtm",
                   help="sqrtm: scipy.linalg.sqrtm, ADM's code path (default); eigh: same trace from "
                        "symmetric eigenvalues, faster on CPU (agrees to ~1e-9)")
    p.add_argument("--distance", choices=metrics.DISTANCE_RULES, default="fp16",
                   help="precision/recall distances: fp16 = ADM's half-precision rule (default), fp32 = exact")
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.bootstrap != 0 and args.bootstrap < metrics.MIN_RESAMPLES:
        p.error(f"--bootstrap must be 0 (off) or >= {metrics.MIN_RESAMPLES} resamples, got {args.bootstrap}")
    return args


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared with evaluations/compare.py: the network, its input and the caches."""
    p.add_argument("--inception-weights", metavar="PATH", default=os.environ.get(WEIGHTS_ENV) or None,
                   help=f"FID Inception weights (pt_inception-2015-12-05-6726825d.pth); default: ${WEIGHTS_ENV}, "
                        f"else ./weights/ or torch.hub's checkpoints folder")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64, as ADM)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2,
                   help="batches read ahead from the npz in a background thread (0: no read-ahead)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="evaluate the first N samples (error if the file holds fewer); default all")
    p.add_argument("--image-size", type=int, default=256,
                   help="expected image height and width of both files (default 256); 0 accepts any size")
    p.add_argument("--recompute-ref-stats", action="store_true",
                   help="compute FID/sFID reference statistics from the reference images instead of the "
                        "precomputed mu/sigma stored in the reference file (ADM uses the stored ones)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the activation caches next to the reference and sample files")
    p.add_argument("--resize", choices=RESIZE_MODES, default="tf1",
                   help="tf1: TensorFlow-1 bilinear, as the ADM graph (default); torch: F.interpolate")
    p.add_argument("--normalize", choices=NORMALIZE_MODES, default="adm",
                   help="adm: (x - 128) / 128 on 0..255 pixels (default); pytorch_fid: 2 * x / 255 - 1")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0 or args.image_size < 0:
        p.error("--num-workers and --image-size must be >= 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def prefetch(batches: Iterable, depth: int) -> Iterator:
    """Iterate `batches` with up to `depth` items read ahead in a background thread."""
    if depth == 0:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:  # False once the consumer has gone away
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@torch.inference_mode()
def compute_activations(model: FIDInception, images: NpzImages, *, batch_size: int, limit: int | None = None,
                        num_workers: int = 0, desc: str = "", keys=("pool", "spatial", "logits")) -> dict:
    """Inception features of the first `limit` images of a batch file, as float32 numpy arrays."""
    n = len(images) if limit is None else limit
    out, start = {}, 0
    for batch in tqdm(prefetch(images.batches(batch_size, n), num_workers), total=-(-n // batch_size),
                      desc=desc, leave=False, file=sys.stderr):
        feats = model(torch.from_numpy(batch))
        for key in keys:
            value = feats[key].float()
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"the Inception network gave NaN/inf '{key}' features for images {start}.."
                                 f"{start + len(batch) - 1} of '{images.path}'; the weight file is broken or "
                                 f"the device computes in reduced precision - check --inception-weights/--device")
            if key not in out:
                out[key] = np.empty((n, value.shape[1]), dtype=np.float32)
            out[key][start:start + len(batch)] = value.cpu().numpy()
        start += len(batch)
    return out


def network_key(model: FIDInception) -> str:
    """Names the network's weights and its pre-processing: activations with equal keys are
    interchangeable (the sampler stores it with the activations it computes while sampling)."""
    return f"{model.identity()}|{model.resize}|{model.normalize}|float32"


def _cache_key(file_sha: str, model: FIDInception) -> str:
    """Names the batch file's bytes, the network weights and the pre-processing."""
    text = f"v{CACHE_VERSION}|{file_sha}|{network_key(model)}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(batch_path: Path, key: str) -> Path:
    return batch_path.with_name(f"{batch_path.stem}.fid-inception-{key[:16]}.npz")




def _read_cache(path: Path, key: str, keys: tuple, rows: int) -> dict | None:
    """The first `rows` cached activations if the cache names this file and network, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if str(data["key"]) != key:
                return None
            acts = {k: data[k] for k in keys}
    except Exception as err:  # a damaged cache is recomputed, never trusted
        print(f"warning: ignoring unreadable cache {path} ({err})", file=sys.stderr)
        return None
    if any(len(v) < rows or not np.isfinite(v[:rows]).all() for v in acts.values()):
        return None
    return {k: v[:rows] for k, v in acts.items()}


def cached_activations(model: FIDInception, images: NpzImages, args, file_sha: str, *, keys: tuple,
                       limit: int, desc: str) -> tuple[dict, dict]:
    """Activations of the first `limit` images, from the cache next to the file when it is valid
    (keyed by the file's SHA-256 and the network), else computed and cached."""
    info = {"cache": None, "cache_hit": False}
    if not args.no_cache:
        key = _cache_key(file_sha, model)
        path = info["cache"] = cache_path(images.path, key)
        acts = _read_cache(path, key, keys, limit)
        if acts is not None:
            info["cache_hit"] = True
            print(f"using cached {desc} activations {path}", file=sys.stderr)
            return acts, info
    acts = compute_activations(model, images, batch_size=args.batch_size, limit=limit, num_workers=args.num_workers,
                               desc=desc, keys=keys)
    if info["cache"] is not None:
        try:
            save_npz(info["cache"], **acts, key=np.array(key))  # also clears a killed run's temporary
        except OSError as err:  # read-only dataset folder: evaluation still succeeds
            print(f"warning: could not write the activation cache {info['cache']} ({err})", file=sys.stderr)
    return acts, info


def reference_activations(model: FIDInception, images: NpzImages, args, ref_sha: str) -> tuple[dict, dict]:
    """pool/spatial of every reference image, from the cache next to the file when it is valid."""
    return cached_activations(model, images, args, ref_sha, keys=("pool", "spatial"), limit=len(images),
                              desc="reference")


def sample_activations(model: FIDInception, images, args, sample_sha: str, limit: int) -> tuple[dict, dict]:
    """pool/spatial/logits of the first `limit` samples, cached next to the sample file, so that
    bootstraps and comparisons (evaluations/compare.py) never recompute them. A run folder gives
    the activations it stored while sampling, else those of its npz."""
    if isinstance(images, RunFolder):
        stored = images.stored_activations(network_key(model), limit)
        if stored is not None:
            print(f"using the activations stored while sampling in {images.path}", file=sys.stderr)
            return stored, {"cache": images.path, "cache_hit": True}
        if not images.npz().is_file():
            raise images.no_images_error(network_key(model))
        print(f"{images.path}: no stored activations of this network; reading {images.npz()}", file=sys.stderr)
        with NpzImages(images.npz(), None, role=images.role) as npz:
            return sample_activations(model, npz, args, verified_sha256(npz.path, npz.role), limit)
    return cached_activations(model, images, args, sample_sha, keys=("pool", "spatial", "logits"), limit=limit,
                              desc="sample")


def open_samples(path: str | os.PathLike, image_size: int | None, role: str = "sample"):
    """A sample batch: an npz (NpzImages) or a sampler's output folder (RunFolder)."""
    return RunFolder(path, image_size, role) if is_run_folder(path) else NpzImages(path, image_size, role=role)


def load_network(args, device: torch.device) -> tuple[FIDInception, Path, str]:
    """(network, weight file, its SHA-256); warns when the file is not the published one."""
    weights = find_weights(args.inception_weights)
    model = FIDInception(weights, resize=args.resize, normalize=args.normalize).to(device)
    file_sha = file_sha256(weights)
    print(f"Inception weights {weights} on {device}", file=sys.stderr)
    warn_if_unpublished(weights, file_sha)
    return model, weights, file_sha


def warn_if_unpublished(weights: Path, file_sha: str) -> None:
    if not file_sha.startswith(PUBLISHED_WEIGHTS_SHA256_PREFIX):
        print(f"warning: {weights} is not the published FID Inception file (its SHA-256 {file_sha[:8]}... does not "
              f"start with {PUBLISHED_WEIGHTS_SHA256_PREFIX}); these numbers are not comparable with published "
              f"ones", file=sys.stderr)


def warn_small_n(n: int, what: str = "samples") -> None:
    if n < MIN_UNBIASED_SAMPLES:
        print(f"warning: scoring {n} {what}: FID is biased at this N; ADM reports use 50,000 (compare numbers only "
              f"at equal N)", file=sys.stderr)


def verify_files(*batches: NpzImages) -> list[str]:
    """SHA-256 of each file, read once, with every npz member's CRC checked in the same pass (a
    run folder: of its manifest and shards)."""
    return [b.sha256() if isinstance(b, RunFolder) else verified_sha256(b.path, b.role) for b in batches]


def _precomputed_stats(images: NpzImages) -> dict:
    """The file's mu/sigma (FID) and mu_s/sigma_s (sFID), validated; {} when it has none."""
    stats = images.read_stats()
    if "mu" not in stats:
        return {}
    missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in stats]
    if missing:
        raise BatchFileError(f"'{images.path}' has 'mu' but lacks {'/'.join(repr(k) for k in missing)}; store all "
                             f"four statistics (mu, sigma, mu_s, sigma_s) or none")
    for mu_key, sigma_key, d in (("mu", "sigma", metrics.POOL_DIM), ("mu_s", "sigma_s", metrics.SPATIAL_DIM)):
        mu, sigma = stats[mu_key], stats[sigma_key]
        if mu.shape != (d,) or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise BatchFileError(f"'{images.path}': '{mu_key}'/'{sigma_key}' have shapes {mu.shape}/{sigma.shape} "
                                 f"or non-finite values; expected finite ({d},) and ({d}, {d})")
    return stats


def check_json_target(path: str | None) -> None:
    """ConfigError unless --json PATH can be written, checked before any work is done: the result
    is written at the end, and an hour of evaluation must not end in a traceback over it."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file name, e.g. --json {target / 'results.json'}")
    folder = target.absolute().parent  # where atomic_write puts its temporary (a symlink is replaced)
    if not folder.exists():
        raise ConfigError(f"--json {path}: folder {folder} does not exist; create it or choose another path")
    if not folder.is_dir():
        raise ConfigError(f"--json {path}: {folder} is a file, not a folder; choose another path")
    _probe_writable(folder, f"--json {path}: folder {folder}")
    if target.is_file() and not os.access(target, os.W_OK):  # write-protected: do not replace it behind its back
        raise ConfigError(f"--json {path} exists and is not writable (Permission denied); make it writable "
                          f"(chmod u+w) or choose another path")


def _probe_writable(folder: Path, what: str) -> None:
    """Create and delete a temporary file in `folder`: the one test that sees permissions, ACLs
    and read-only mounts alike."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".softcfg-write-probe.", dir=folder)
    except OSError as err:
        raise ConfigError(f"{what} is not writable ({err.strerror or err}); choose a writable folder") from None
    os.close(fd)
    os.unlink(probe)


def evaluate(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run the whole evaluation; returns (the five metrics, the settings used)."""
    check_json_target(args.json)
    size = args.image_size or None
    with NpzImages(args.ref_batch, size, role="reference") as ref, \
            open_samples(args.sample_batch, size, role="sample") as sample:
        n_sample = args.num_samples or len(sample)
        if n_sample > len(sample):
            raise BatchFileError(f"sample file '{sample.path}' holds {len(sample)} images, fewer than "
                                 f"--num-samples {n_sample}; sample more images or lower --num-samples")
        for name, n in (("reference", len(ref)), ("sample", n_sample)):
            if n < MIN_IMAGES:
                raise BatchFileError(f"the {name} batch has {n} images; precision/recall (k=3) need at least "
                                     f"{MIN_IMAGES} (ADM results use 10,000 reference and 50,000 sample images)")
        ref_sha, sample_sha = verify_files(ref, sample)  # before any number: a corrupt file is an error
        ref_stats = {} if args.recompute_ref_stats else _precomputed_stats(ref)
        sample_stats = _precomputed_stats(sample)
        device = resolve_device(args.device)
        model, weights, weights_sha = load_network(args, device)
        warn_small_n(n_sample)

        print("computing reference batch activations...")
        ref_acts, cache = reference_activations(model, ref, args, ref_sha)
        print("computing/reading reference batch statistics...")
        print("computing sample batch activations...")
        sample_acts, sample_cache = sample_activations(model, sample, args, sample_sha, n_sample)
        print("computing/reading sample batch statistics...")
        print("Computing evaluations...")
        results = metrics.compute_all({**ref_acts, **ref_stats}, {**sample_acts, **sample_stats},
                                      fid_method=args.fid_method, distance=args.distance, device=device)
        if args.bootstrap:
            results["bootstrap"] = bootstrap_results({**ref_acts, **ref_stats}, sample_acts, results, args, device)
        settings = {
            "ref_batch": str(ref.path), "ref_sha256": ref_sha, "num_ref": len(ref),
            "sample_batch": str(sample.path), "num_samples": n_sample, "image_size": list(sample.shape[1:3]),
            "ref_stats": ("precomputed mu/sigma/mu_s/sigma_s from the reference file" if ref_stats
                          else "computed from the reference images (arr_0)"),
            "sample_stats": ("precomputed mu/sigma/mu_s/sigma_s from the sample file" if sample_stats
                             else "computed from the sample images"),
            "sample_sha256": sample_sha, "sample_activation_cache": str(sample_cache["cache"] or ""),
            "sample_cache_hit": sample_cache["cache_hit"],
            "inception_weights": str(weights), "inception_sha256": model.identity(),
            "inception_file_sha256": weights_sha,
            "resize": args.resize, "normalize": args.normalize, "dtype": "float32",
            "batch_size": args.batch_size, "device": str(device), "num_workers": args.num_workers,
            "activation_cache": str(cache["cache"]) if cache["cache"] else None, "cache_hit": cache["cache_hit"],
            "fid_method": args.fid_method, "distance": args.distance, "k": 3, "is_split_size": 5000,
            "pr_batch_size": 10000, "versions": {"torch": torch.__version__, "numpy": np.__version__,
                                                 "scipy": scipy.__version__},
        }
    return results, settings


def bootstrap_results(ref: dict, sample_acts: dict, results: dict, args, device) -> dict:
    """Bootstrap std and 95 % interval of every metric, centred on the reported (ADM) value."""
    intervals = metrics.bootstrap(ref, sample_acts, args.bootstrap, args.bootstrap_seed, device=device,
                                  precision_recall=args.bootstrap_precision_recall, values=results)
    return {"num_resamples": args.bootstrap, "seed": args.bootstrap_seed,
            "interval": "95% = value +- 1.96 bootstrap std (samples resampled, reference fixed)", **intervals}


def bootstrap_lines(boot: dict) -> list[str]:
    """`FID: 1.2711 ± 0.0123 (95% CI 1.2502-1.2960)`, one line per bootstrapped metric."""
    lines = [f"bootstrap over {boot['num_resamples']} resamples (seed {boot['seed']}):"]
    for label, key, digits in BOOTSTRAP_LINES:
        if key in boot:
            d = boot[key]
            lines.append(f"{label}: {d['value']:.{digits}f} ± {d['std']:.{digits}f} "
                         f"(95% CI {d['ci_low']:.{digits}f}-{d['ci_high']:.{digits}f})")
    return lines


def write_json(path: str, results: dict, settings: dict) -> None:
    text = json.dumps({**results, "settings": settings}, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def write_json_or_explain(path: str, results: dict, settings: dict) -> int:
    """write_json after the results were printed: a failure now (disk full, folder removed) is
    one line and exit 2, and the printed results stand."""
    try:
        write_json(path, results, settings)
    except OSError as err:
        print(f"error: could not write --json {path} ({err.strerror or err}); the results printed above are "
              f"complete", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results, settings = evaluate(args)
    except (SoftCFGError, ValueError, OSError, zipfile.BadZipFile) as err:  # bad input: exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    for label, key in RESULT_LINES:  # only now: never a partial result
        print(f"{label}: {results[key]}")
    if "bootstrap" in results:
        print("\n".join(bootstrap_lines(results["bootstrap"])))
    if args.json:
        return write_json_or_explain(args.json, results, settings)
    return 0


def command() -> None:
    """The `softcfg-evaluate` console script."""
    sys.exit(main())


if __name__ == "__main__":
    command()
