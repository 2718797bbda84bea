"""Is B better than A? Paired bootstrap comparison of two sample batches against one reference.

    python evaluations/compare.py REF.npz A.npz B.npz [--bootstrap 200] [--json out.json]

A and B must come from the same labels and seeds (two guidance settings of our samplers): row i
of A and row i of B then share their class and their random draws, and one set of resampled row
indices applied to both cancels that shared noise in the difference. The check reads the
samplers' npz extras: `labels` (must be equal) and `manifest` (JSON; images["sample.seed"] and
images["sample.per_proc_batch_size"] must be equal). Files without them (an ADM reference-style
npz) or with different ones are refused unless --unpaired, which bootstraps each set on its
own and adds the variances (a much wider interval).

A and B may be sampler run folders instead of npz files (their shards give the labels and
the activations stored while sampling; see evaluator.py).

Prints both sets' metrics with their bootstrap std, the deltas B - A with 95 % intervals
(delta +- 1.96 std) and two-sided p-values (normal approximation), and one verdict per metric.
Activations come from the evaluator's caches next to each file. Errors exit 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path

if not __package__:  # run as a script: make `evaluations` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from evaluations import evaluator as E
from evaluations import metrics
from evaluations.npz import BatchFileError, NpzImages
from softcfg_patch.errors import SoftCFGError

PAIRING_KEYS = ("sample.seed", "sample.per_proc_batch_size")
LOWER_IS_BETTER = {"fid": True, "sfid": True, "inception_score": False, "precision": False, "recall": False}
LABELS = {key: label for label, key, _ in E.BOOTSTRAP_LINES}
DIGITS = {key: digits for _, key, digits in E.BOOTSTRAP_LINES}


class PairingError(SoftCFGError, ValueError):
    """A and B cannot be compared row by row; the message says why and what to do."""


class NoManifestError(PairingError):
    """A file carries no sampling manifest and labels, so its pairing cannot be checked."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluations/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("ref_batch", help="reference batch .npz (as for the evaluator)")
    p.add_argument("batch_a", help="sample batch A .npz or run folder (e.g. CFG)")
    p.add_argument("batch_b", help="sample batch B .npz or run folder (e.g. SoftCFG), same labels and seeds as A")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="resamples (>= 10; default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    p.add_argument("--unpaired", action="store_true",
                   help="compare sets not sampled with the same labels and seeds (independent bootstraps)")
    p.add_argument("--precision-recall", action="store_true",
                   help="compare precision and recall too (one k-NN search per resample: slow)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdicts (default 0.05)")
    p.add_argument("--json", metavar="PATH", help="also write everything printed to PATH")
    E.add_common_args(p)
    args = p.parse_args(argv)
    E.check_common_args(p, args)
    if args.bootstrap < metrics.MIN_RESAMPLES:
        p.error(f"--bootstrap must be >= {metrics.MIN_RESAMPLES}, got {args.bootstrap}")
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    return args


# ----------------------------------------------------------------------------- pairing

def sampling_record(images: NpzImages) -> dict | None:
    """{"labels", "images"} from the sampler's npz extras, or None when the file has neither."""
    extras = images.read_arrays(("labels", "manifest"))
    if "labels" not in extras or "manifest" not in extras:
        return None
    try:
        manifest = json.loads(str(extras["manifest"][()]))
        settings = manifest["images"]
    except (ValueError, KeyError, TypeError) as err:
        raise BatchFileError(f"'{images.path}': its 'manifest' is not the samplers' JSON manifest ({err})") from err
    return {"labels": np.asarray(extras["labels"]), "images": settings}


def check_pairing(a: NpzImages, b: NpzImages, n: int) -> str:
    """Raises PairingError unless the first n rows of A and B were drawn with the same labels and
    seeds; returns a one-line description of what was checked."""
    records = {"A": sampling_record(a), "B": sampling_record(b)}
    lacking = [f"{name} ('{f.path}')" for name, f in (("A", a), ("B", b)) if records[name] is None]
    if lacking:
        raise NoManifestError(f"{' and '.join(lacking)} carry no sampling manifest and labels (an ADM reference-style "
                           f"npz?), so A and B cannot be checked to share labels and seeds; pass --unpaired to "
                           f"compare them as independent sets")
    ra, rb = records["A"], records["B"]
    problems = [f"{key} {ra['images'].get(key)!r} (A) vs {rb['images'].get(key)!r} (B)" for key in PAIRING_KEYS
                if ra["images"].get(key) != rb["images"].get(key)]
    if len(ra["labels"]) < n or len(rb["labels"]) < n or not np.array_equal(ra["labels"][:n], rb["labels"][:n]):
        problems.append("the labels differ")
    if problems:
        raise PairingError(f"A and B were not sampled with the same labels and seeds ({'; '.join(problems)}); "
                           f"sample both with the same sample.seed and sample.per_proc_batch_size, or pass "
                           f"--unpaired")
    same = ", ".join(f"{k}={ra['images'][k]}" for k in PAIRING_KEYS)
    return f"paired: same labels and {same}"


def pairing_of(a: NpzImages, b: NpzImages, n: int, args) -> str:
    """check_pairing, except that a caller who knows the pairing from elsewhere (scripts/
    collect_results.py, from its result rows) sets args.paired_by for files without manifests."""
    try:
        return check_pairing(a, b, n)
    except NoManifestError:
        if not getattr(args, "paired_by", None):
            raise
        return f"paired by {args.paired_by}; the files carry no sampling manifest"


def warn_if_same(a: NpzImages, b: NpzImages, sha_a: str, sha_b: str) -> None:
    """A and B with the same bytes (the same path twice, or a copy) compare as delta 0, p = 1: a
    result that looks like "no difference" but only says the command named one file twice."""
    if sha_a == sha_b:
        print(f"warning: A and B are the same file ('{a.path}' and '{b.path}' have the same SHA-256 "
              f"{sha_a[:16]}...): every delta is 0 and p = 1; pass two different sample batches", file=sys.stderr)


# ----------------------------------------------------------------------------- statistics

def unpaired_bootstrap(ref: dict, acts_a: dict, acts_b: dict, args) -> dict:
    """Independent bootstraps of A and B (different seeds); the delta's variance is the sum."""
    opts = dict(precision_recall=args.precision_recall, device=args.torch_device)
    boot_a = metrics.bootstrap(ref, acts_a, args.bootstrap, args.seed, **opts)
    boot_b = metrics.bootstrap(ref, acts_b, args.bootstrap, args.seed + 1, **opts)
    out = {}
    for metric in boot_a:
        a, b = boot_a[metric]["value"], boot_b[metric]["value"]
        std = math.hypot(boot_a[metric]["std"], boot_b[metric]["std"])
        out[metric] = {"a": a, "b": b, "delta": b - a, "std": std, "ci_low": b - a - metrics.Z95 * std,
                       "ci_high": b - a + metrics.Z95 * std, "p_value": metrics.two_sided_p(b - a, std),
                       "a_std": boot_a[metric]["std"], "b_std": boot_b[metric]["std"]}
    return out


def verdict(metric: str, d: dict, alpha: float) -> str:
    if d["p_value"] >= alpha:
        return f"no detectable difference at this N (p = {d['p_value']:.3g})"
    b_better = (d["delta"] < 0) == LOWER_IS_BETTER[metric]
    return f"{'B is better than A' if b_better else 'A is better than B'} (p = {d['p_value']:.3g})"


def report_lines(result: dict) -> list[str]:
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"{result['num_samples']} samples each, {result['pairing']}, {result['num_resamples']} resamples",
             f"{'metric':<16}{'A':>22}{'B':>22}{'B - A (95% CI)':>38}{'p':>9}"]
    for metric, d in result["metrics"].items():
        f = DIGITS.get(metric, 4)
        a = "{:.{f}f} ± {:.{f}f}".format(d["a"], d["a_std"], f=f)
        b = "{:.{f}f} ± {:.{f}f}".format(d["b"], d["b_std"], f=f)
        delta = "{:+.{f}f} ({:+.{f}f} to {:+.{f}f})".format(d["delta"], d["ci_low"], d["ci_high"], f=f)
        lines.append(f"{LABELS[metric]:<16}{a:>22}{b:>22}{delta:>38}{d['p_value']:>9.3g}")
    lines += [f"{LABELS[m]}: {v}" for m, v in result["verdicts"].items()]
    return lines


# ----------------------------------------------------------------------------- main

def compare(args: argparse.Namespace, network: tuple | None = None) -> dict:
    """Everything compare.py prints, as a dict. `network`: an already loaded (model, path, sha)."""
    size = args.image_size or None
    with NpzImages(args.ref_batch, size, role="reference") as ref, \
            E.open_samples(args.batch_a, size, role="sample A") as a, \
            E.open_samples(args.batch_b, size, role="sample B") as b:
        n = args.num_samples or len(a)
        if args.num_samples is None and len(a) != len(b) and not args.unpaired:
            raise PairingError(f"A holds {len(a)} images and B {len(b)}; paired sets need the same rows (or pass "
                               f"--num-samples to compare the first N of each)")
        for images in (a, b):
            if len(images) < n:
                raise BatchFileError(f"{images.role} file '{images.path}' holds {len(images)} images, fewer than "
                                     f"{n}; lower --num-samples")
        if min(len(ref), n) < E.MIN_IMAGES:
            raise BatchFileError(f"need at least {E.MIN_IMAGES} reference and sample images, got {len(ref)} and {n}")
        pairing = "unpaired (independent bootstraps)" if args.unpaired else pairing_of(a, b, n, args)
        shas = E.verify_files(ref, a, b)  # before any number: a corrupt file is an error
        warn_if_same(a, b, shas[1], shas[2])
        ref_stats = {} if args.recompute_ref_stats else E._precomputed_stats(ref)
        args.torch_device = E.resolve_device(args.device)
        model, weights, _ = network or E.load_network(args, args.torch_device)
        E.warn_small_n(n)
        ref_acts, _ = E.reference_activations(model, ref, args, shas[0])
        acts_a, _ = E.sample_activations(model, a, args, shas[1], n)
        acts_b, _ = E.sample_activations(model, b, args, shas[2], n)
    reference = {**ref_acts, **ref_stats}
    if args.unpaired:
        stats = unpaired_bootstrap(reference, acts_a, acts_b, args)
    else:
        stats = metrics.paired_bootstrap(reference, acts_a, acts_b, args.bootstrap, args.seed,
                                         precision_recall=args.precision_recall, device=args.torch_device)
    return {"ref": str(args.ref_batch), "a": str(args.batch_a), "b": str(args.batch_b), "num_samples": n,
            "pairing": pairing, "paired": not args.unpaired, "num_resamples": args.bootstrap, "seed": args.seed,
            "interval": "95% = delta +- 1.96 bootstrap std; p two-sided, normal approximation",
            "metrics": stats, "settings": {"inception_weights": str(weights), "fid_method": "eigh"},
            "verdicts": {m: verdict(m, d, args.alpha) for m, d in stats.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        E.check_json_target(args.json)
        result = compare(args)
    except (SoftCFGError, ValueError, OSError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(result)))
    if args.json:
        return E.write_json_or_explain(args.json, {k: v for k, v in result.items() if k != "settings"},
                                       result["settings"])
    return 0


def command() -> None:
    """The `softcfg-compare` console script."""
    sys.exit(main())


if __name__ == "__main__":
    command()
