"""ADM evaluator in PyTorch: FID, sFID, Inception Score, precision and recall of an npz sample batch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json out.json]

Prints the same progress and result lines, in the same order, as openai/guided-diffusion's
`evaluations/evaluator.py` (TensorFlow), e.g.

    Inception Score: 215.8370361328125
    FID: 3.9425574129223264
    sFID: 6.140433703346162
    Precision: 0.8265
    Recall: 0.5309

Errors (bad files, missing weights, broken features) exit with status 2, a one-line reason on
stderr and no result lines. See `--help` for the options.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

if not __package__:  # run as a script: make `evaluations` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import scipy
import torch
from tqdm import tqdm

from evaluations import metrics
from evaluations.inception import (NORMALIZE_MODES, RESIZE_MODES, WEIGHTS_ENV, FIDInception,
                                   InceptionWeightsError, find_weights)
from evaluations.npz import BatchFileError, NpzImages, file_sha256

CACHE_VERSION = 1
RESULT_LINES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                ("Precision", "precision"), ("Recall", "recall"))
MIN_IMAGES = 4  # k + 1 for the k=3 manifold radii


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluations/evaluator.py",
        description="FID, sFID, Inception Score, precision and recall exactly as the ADM evaluator "
                    "(openai/guided-diffusion), in PyTorch.")
    p.add_argument("ref_batch", help="reference batch .npz (arr_0 images; optional mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample_batch", help="sample batch .npz (arr_0: uint8 [N, H, W, 3])")
    p.add_argument("--json", metavar="PATH", help="also write the five metrics and the settings used to PATH")
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
                   help="neither read nor write the reference activation cache next to the reference file")
    p.add_argument("--resize", choices=RESIZE_MODES, default="tf1",
                   help="tf1: TensorFlow-1 bilinear, as the ADM graph (default); torch: F.interpolate")
    p.add_argument("--normalize", choices=NORMALIZE_MODES, default="adm",
                   help="adm: (x - 128) / 128 on 0..255 pixels (default); pytorch_fid: 2 * x / 255 - 1")
    p.add_argument("--fid-method", choices=metrics.FID_METHODS, default="sqrtm",
                   help="sqrtm: scipy.linalg.sqrtm, ADM's code path (default); eigh: same trace from "
                        "symmetric eigenvalues, faster on CPU (agrees to ~1e-9)")
    p.add_argument("--distance", choices=metrics.DISTANCE_RULES, default="fp16",
                   help="precision/recall distances: fp16 = ADM's half-precision rule (default), fp32 = exact")
    args = p.parse_args(argv)
    for name in ("batch_size", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0 or args.image_size < 0:
        p.error("--num-workers and --image-size must be >= 0")
    return args


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


def _cache_key(ref_sha: str, model: FIDInception) -> str:
    """Names the reference file's bytes, the network weights and the pre-processing."""
    text = f"v{CACHE_VERSION}|{ref_sha}|{model.identity()}|{model.resize}|{model.normalize}|float32"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(ref_path: Path, key: str) -> Path:
    return ref_path.with_name(f"{ref_path.stem}.fid-inception-{key[:16]}.npz")


def _atomic_save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def reference_activations(model: FIDInception, images: NpzImages, args, ref_sha: str) -> tuple[dict, dict]:
    """pool/spatial of every reference image, from the cache next to the file when it is valid."""
    info = {"cache": None, "cache_hit": False}
    if not args.no_cache:
        key = _cache_key(ref_sha, model)
        path = info["cache"] = cache_path(images.path, key)
        if path.is_file():
            try:
                with np.load(path) as data:
                    acts = {k: data[k] for k in ("pool", "spatial")}
                    ok = str(data["key"]) == key and all(len(v) == len(images) for v in acts.values())
                if ok and all(np.isfinite(v).all() for v in acts.values()):
                    info["cache_hit"] = True
                    print(f"using cached reference activations {path}", file=sys.stderr)
                    return acts, info
            except Exception as err:  # a damaged cache is recomputed, never trusted
                print(f"warning: ignoring unreadable cache {path} ({err})", file=sys.stderr)
    acts = compute_activations(model, images, batch_size=args.batch_size, num_workers=args.num_workers,
                               desc="reference", keys=("pool", "spatial"))
    if info["cache"] is not None:
        try:
            _atomic_save_npz(info["cache"], {**acts, "key": np.array(key)})
        except OSError as err:  # read-only dataset folder: evaluation still succeeds
            print(f"warning: could not write the activation cache {info['cache']} ({err})", file=sys.stderr)
    return acts, info


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


def evaluate(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run the whole evaluation; returns (the five metrics, the settings used)."""
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    size = args.image_size or None
    with NpzImages(args.ref_batch, size, role="reference") as ref, \
            NpzImages(args.sample_batch, size, role="sample") as sample:
        n_sample = args.num_samples or len(sample)
        if n_sample > len(sample):
            raise BatchFileError(f"sample file '{sample.path}' holds {len(sample)} images, fewer than "
                                 f"--num-samples {n_sample}; sample more images or lower --num-samples")
        for name, n in (("reference", len(ref)), ("sample", n_sample)):
            if n < MIN_IMAGES:
                raise BatchFileError(f"the {name} batch has {n} images; precision/recall (k=3) need at least "
                                     f"{MIN_IMAGES} (ADM results use 10,000 reference and 50,000 sample images)")
        ref_stats = {} if args.recompute_ref_stats else _precomputed_stats(ref)
        sample_stats = _precomputed_stats(sample)
        device = resolve_device(args.device)
        weights = find_weights(args.inception_weights)
        model = FIDInception(weights, resize=args.resize, normalize=args.normalize).to(device)
        print(f"Inception weights {weights} on {device}", file=sys.stderr)

        print("computing reference batch activations...")
        ref_sha = file_sha256(ref.path)
        ref_acts, cache = reference_activations(model, ref, args, ref_sha)
        print("computing/reading reference batch statistics...")
        print("computing sample batch activations...")
        sample_acts = compute_activations(model, sample, batch_size=args.batch_size, limit=n_sample,
                                          num_workers=args.num_workers, desc="samples")
        print("computing/reading sample batch statistics...")
        print("Computing evaluations...")
        results = metrics.compute_all({**ref_acts, **ref_stats}, {**sample_acts, **sample_stats},
                                      fid_method=args.fid_method, distance=args.distance, device=device)
        settings = {
            "ref_batch": str(ref.path), "ref_sha256": ref_sha, "num_ref": len(ref),
            "sample_batch": str(sample.path), "num_samples": n_sample, "image_size": list(sample.shape[1:3]),
            "ref_stats": ("precomputed mu/sigma/mu_s/sigma_s from the reference file" if ref_stats
                          else "computed from the reference images (arr_0)"),
            "sample_stats": ("precomputed mu/sigma/mu_s/sigma_s from the sample file" if sample_stats
                             else "computed from the sample images"),
            "inception_weights": str(weights), "inception_sha256": model.identity(),
            "resize": args.resize, "normalize": args.normalize, "dtype": "float32",
            "batch_size": args.batch_size, "device": str(device), "num_workers": args.num_workers,
            "activation_cache": str(cache["cache"]) if cache["cache"] else None, "cache_hit": cache["cache_hit"],
            "fid_method": args.fid_method, "distance": args.distance, "k": 3, "is_split_size": 5000,
            "pr_batch_size": 10000, "versions": {"torch": torch.__version__, "numpy": np.__version__,
                                                 "scipy": scipy.__version__},
        }
    return results, settings


def write_json(path: str, results: dict, settings: dict) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**results, "settings": settings}, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results, settings = evaluate(args)
    except (BatchFileError, InceptionWeightsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for label, key in RESULT_LINES:  # only now: never a partial result
        print(f"{label}: {results[key]}")
    if args.json:
        write_json(args.json, results, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
