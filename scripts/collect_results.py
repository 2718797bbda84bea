#!/usr/bin/env python
"""Turn result rows (scripts/run_setting.py) into the paper's table: markdown and CSV.

    python scripts/collect_results.py results/table1_alitok [more folders ...] [--out PREFIX]
    python scripts/collect_results.py results/table1_alitok --baseline CFG   # + paired deltas

Reads every FOLDER/rows/*.json (or FOLDER/*.json), groups rows that differ only in the seed,
and writes PREFIX.md and PREFIX.csv (default: FIRST_FOLDER/results). Each metric is shown as
mean ± sample standard deviation (ddof 1) over the seeds, with the number of seeds, so a
0.05 FID gap can be compared with seed noise; "FID boot" is one run's bootstrap std (the
evaluator's --bootstrap, averaged over the seeds), the noise floor of a single run.

--baseline METHOD pairs every other row with the baseline row of the same model, seed, sample
count and batch size (same labels and seeds) and adds "ΔFID vs METHOD": the paired-bootstrap
delta (evaluations/compare.py, cached in FOLDER/pairs/), averaged over the seeds, with a 95 %
interval (mean +- 1.96 sqrt(sum std_i^2) / n_seeds) and its p-value. This needs the sample
npz files (not deleted with DELETE_SAMPLES=1). SMOKE rows are labelled in every output.
--best METHOD prints the run_setting.py options of the method's lowest-FID setting.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from softcfg_patch.errors import SoftCFGError, exit_on_error  # noqa: E402
from softcfg_patch.guidance import Guidance  # noqa: E402
from softcfg_patch.guidance import method as method_of  # noqa: E402  ('method' is a table column here)
from softcfg_patch.run import registry  # noqa: E402
from softcfg_patch.files import atomic_write  # noqa: E402

METRICS = (("fid", "FID", 3), ("inception_score", "IS", 1), ("sfid", "sFID", 3),
           ("precision", "Precision", 3), ("recall", "Recall", 3))  # (key, column, decimals)
REQUIRED = ("model", "method", "smoke", "guidance", "seed", "num_samples", "metrics", "git_commit")
SMOKE_BANNER = ("> **SMOKE run** - tiny golden models, a random reference batch and a randomly "
                "initialised Inception network: these are **NOT real FID / IS numbers**.")


def load_rows(folders: Iterable, what: str = "a table script") -> list:
    """Every row json under the folders; a broken row, or none at all, is an error naming the files."""
    folders = list(folders)
    rows = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SoftCFGError(f"{folder} is not a folder of result rows (expected e.g. results/table1_alitok)")
        files = sorted((folder / "rows").glob("*.json")) or sorted(folder.glob("*.json"))
        for path in files:
            try:
                row = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise SoftCFGError(f"cannot read row {path}: {err}; delete it and rerun its setting")
            lacking = [k for k in REQUIRED if k not in row]
            if lacking:
                raise SoftCFGError(f"row {path} lacks {lacking}; delete it and rerun its setting")
            rows.append(row)
    if not rows:
        raise SoftCFGError(f"no result rows in {', '.join(map(str, folders))} (run {what} first)")
    return rows


def mean_or_none(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def boot_std(row: dict, key: str) -> Optional[float]:
    boot = row.get("bootstrap") or {}
    return boot.get(key, {}).get("std")


def mean_std(values: list) -> tuple:
    """(mean, sample std with ddof 1 or None for one value, n)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def model_rank(model: str) -> tuple:
    return registry.size_rank(model)


def reference_fids(groups: list) -> list:
    """"llamagen_xl 2.62" for every model in the table with a published FID (registry)."""
    models = sorted({g["model"] for g in groups}, key=model_rank)
    known = {name: fid for family in registry.MODELS.values() for name, fid in family.reference_fid.items()}
    return [f"{m} {known[m]:g}" for m in models if m in known]


def summarize(rows: list) -> list:
    """One group per (model, method, settings, samples, smoke); seeds are averaged."""
    groups: dict = {}
    for row in rows:
        key = (row["model"], row["method"], json.dumps(row["guidance"], sort_keys=True),
               row["num_samples"], bool(row["smoke"]))
        groups.setdefault(key, []).append(row)
    out = []
    for (model, method, _, num, smoke), members in groups.items():
        members.sort(key=lambda r: r["seed"])
        out.append({
            "model": model, "method": method, "smoke": smoke, "num_samples": num,
            "guidance": members[0]["guidance"], "order": min(r.get("order", 0) for r in members),
            "seeds": [r["seed"] for r in members],
            "metrics": {k: mean_std([float(r["metrics"][k]) for r in members]) for k, _, _ in METRICS},
            "boot_std": {k: mean_or_none([boot_std(r, k) for r in members]) for k, _, _ in METRICS},
            "rows": members,
            "git_commits": sorted({r["git_commit"] for r in members}),
            "inception": sorted({str(r.get("inception_weights", {}).get("sha256")) for r in members}),
        })
    out.sort(key=lambda g: (model_rank(g["model"]), g["order"], g["method"],
                            g["guidance"]["guidance_scale"], g["guidance"]["guidance_scale_pow"]))
    return out


def settings_text(g: dict) -> str:
    """The guidance settings in a few symbols: gamma, k, alpha and the SoftCFG options."""
    s = g["guidance"]
    if method_of(Guidance(**s), registry.get(g["model"])) == "noguidance":
        parts = [f"γ={s['guidance_scale']:g} (unguided)"]
    else:
        parts = [f"γ={s['guidance_scale']:g}", f"k={s['guidance_scale_pow']:g}"]
        if s["softcfg_strength"] > 0:
            parts += [f"α={s['softcfg_strength']:g}", "StepNorm" if s["step_norm"] else "no StepNorm",
                      f"{s['softcfg_target']}/{s['softcfg_confidence']}/{s['softcfg_align']}"]
    if s["randomize_temperature"] != 1:
        parts.append(f"T={s['randomize_temperature']:g}")
    return " ".join(parts)


def cell(stat: tuple, decimals: int) -> str:
    mean, std, _ = stat
    return f"{mean:.{decimals}f}" if std is None else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def delta_text(d: Optional[dict]) -> str:
    if not d:
        return "-"
    return f"{d['delta']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f}), p = {d['p_value']:.2g}"


def to_markdown(groups: list, title: str, baseline: Optional[str] = None) -> str:
    lines = [f"# {title}", ""]
    if any(g["smoke"] for g in groups):
        lines += [SMOKE_BANNER, ""]
    extra = ["FID boot"] + ([f"ΔFID vs {baseline} (95% CI)"] if baseline else [])
    lines += ["| model | method | " + " | ".join([c for _, c, _ in METRICS] + extra) + " | seeds | settings |",
              "|---|---|" + "---:|" * (len(METRICS) + len(extra)) + "---|---|"]
    for g in groups:
        model = g["model"] + (" (SMOKE)" if g["smoke"] else "")
        cells = [cell(g["metrics"][k], d) for k, _, d in METRICS]
        cells.append("-" if g["boot_std"]["fid"] is None else f"± {g['boot_std']['fid']:.3f}")
        if baseline:
            cells.append(delta_text(g.get("delta_fid")))
        lines.append(f"| {model} | {g['method']} | {' | '.join(cells)} | {len(g['seeds'])} | {settings_text(g)} |")
    nums = sorted({g["num_samples"] for g in groups})
    commits = sorted({c for g in groups for c in g["git_commits"]})
    lines += ["", f"Mean ± sample std (ddof 1) over the seeds; {', '.join(map(str, nums))} samples per run; "
                  f"code {', '.join(c[:12] + ('-dirty' if c.endswith('-dirty') else '') for c in commits)}.",
              f"FID boot: one run's bootstrap std of FID (the noise floor at that N: {noise_floor(groups)})."]
    if baseline:
        lines.append(f"ΔFID vs {baseline}: paired bootstrap against the {baseline} run with the same seed (same "
                     f"labels and random draws), mean over seeds, 95% interval; negative = lower FID than "
                     f"{baseline}. Paired settings: {sum(1 for g in groups if g.get('delta_fid'))}"
                     + (f"; not paired: {'; '.join(sorted({n for g in groups for n in g.get('unpaired', [])}))}"
                        if any(g.get("unpaired") for g in groups) else "") + ".")
    if reference_fids(groups):
        lines += ["", "Published FID (upstream README, CFG at the upstream setting, 50k samples): "
                      + ", ".join(reference_fids(groups)) + "."]
    return "\n".join(lines) + "\n"


def noise_floor(groups: list) -> str:
    """Median bootstrap std of FID per sample count, e.g. '± 0.012 at 10000 samples'."""
    parts = []
    for num in sorted({g["num_samples"] for g in groups}):
        stds = [g["boot_std"]["fid"] for g in groups if g["num_samples"] == num and g["boot_std"]["fid"]]
        if stds:
            parts.append(f"median ± {statistics.median(stds):.3f} at {num} samples")
    return "; ".join(parts) or "no bootstrap in these rows"


# ----------------------------------------------------------------------------- paired deltas
def pair_key(row: dict) -> tuple:
    """Rows with equal keys were sampled with the same labels and seeds."""
    return (row["model"], row["seed"], row["num_samples"], bool(row["smoke"]), row.get("per_proc_batch_size"))


def add_paired_deltas(groups: list, folder: Path, baseline: str, num_resamples: int, device: str) -> None:
    """g["delta_fid"] (and g["paired"]: per-metric, per seed) for every non-baseline group."""
    base_rows = {pair_key(r): r for g in groups if g["method"] == baseline for r in g["rows"]}
    if not base_rows:
        raise SoftCFGError(f"--baseline {baseline}: no rows with method '{baseline}' in {folder}")
    networks: dict = {}
    for g in groups:
        if g["method"] == baseline:
            continue
        per_seed, g["unpaired"] = [], []
        for row in g["rows"]:
            base = base_rows.get(pair_key(row))
            if base is None:
                g["unpaired"].append(f"{g['method']} seed {row['seed']}: no {baseline} row with that seed")
                continue
            if base["run"] == row["run"]:  # the very same samples (e.g. SoftCFG options on a CFG run)
                continue
            result = paired_result(folder, base, row, num_resamples, device, networks)
            if isinstance(result, str):
                g["unpaired"].append(result)
            else:
                per_seed.append(result)
        if per_seed:
            g["paired"] = per_seed
            g["delta_fid"] = combine([r["metrics"]["fid"] for r in per_seed])


def combine(deltas: list) -> dict:
    """Mean delta over independent seeds; its std is sqrt(sum std_i^2) / n."""
    from evaluations.metrics import Z95, two_sided_p  # torch only when pairs are combined
    n = len(deltas)
    delta = sum(d["delta"] for d in deltas) / n
    std = math.sqrt(sum(d["std"] ** 2 for d in deltas)) / n
    return {"delta": delta, "std": std, "ci_low": delta - Z95 * std, "ci_high": delta + Z95 * std,
            "p_value": two_sided_p(delta, std), "n_seeds": n}


def paired_result(folder: Path, base: dict, row: dict, num_resamples: int, device: str, networks: dict):
    """compare.py's result for (baseline row, row), cached in FOLDER/pairs/; a str says why not."""
    cache = folder / "pairs" / f"{base['run']}__{row['run']}.b{num_resamples}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    missing = [p for p in (base["samples"], row["samples"]) if not Path(p).exists()]  # npz or run folder
    if missing:
        return f"{row['method']} seed {row['seed']}: samples deleted ({Path(missing[0]).name})"
    from evaluations import compare, evaluator  # torch only when pairs are asked for
    argv = [row["reference"]["path"], base["samples"], row["samples"], "--bootstrap", str(num_resamples),
            "--device", device, "--image-size", "0"]
    if row["inception_weights"].get("path"):
        argv += ["--inception-weights", row["inception_weights"]["path"]]
    args = compare.parse_args(argv)
    args.paired_by = "the result rows (same model, seed, batch size and sample count)"
    key = (args.inception_weights, device)
    try:
        if key not in networks:
            networks[key] = evaluator.load_network(args, evaluator.resolve_device(device))
        result = compare.compare(args, networks[key])
    except (ValueError, OSError) as err:
        raise SoftCFGError(f"pairing {base['run']} with {row['run']} failed: {err}")
    atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return result


def best_group(groups: list, method: str) -> dict:
    candidates = [g for g in groups if g["method"] == method]
    if not candidates:
        raise SoftCFGError(f"--best {method}: no rows with that method")
    return min(candidates, key=lambda g: g["metrics"]["fid"][0])


def search_summary(groups: list, methods: tuple = ("CFG", "SoftCFG")) -> str:
    """The proxy grid's best point per method, their FID difference and the noise floor."""
    best = [best_group(groups, m) for m in methods]
    fids = [g["metrics"]["fid"][0] for g in best]
    floor = statistics.median(g["boot_std"]["fid"] for g in groups if g["boot_std"]["fid"]) if any(
        g["boot_std"]["fid"] for g in groups) else float("nan")
    lines = [SMOKE_BANNER, ""] if any(g["smoke"] for g in groups) else []
    lines += [f"- best {m} on the proxy grid: FID {f:.3f} ({settings_text(g)}, {g['num_samples']} samples)"
             for m, f, g in zip(methods, fids, best)]
    spread = sorted(g["metrics"]["fid"][0] for g in groups)
    lines += [f"- difference {methods[1]} - {methods[0]}: {fids[1] - fids[0]:+.3f}; the grid spans "
              f"{spread[0]:.3f} to {spread[-1]:.3f}",
              f"- noise floor: one proxy run's bootstrap std of FID is ± {floor:.3f}; grid differences below "
              f"~{2 * floor:.3f} (2 std) are not resolved at this N, hence the paired confirmation runs"]
    return "\n".join(lines) + "\n"


def best_setting(groups: list, method: str) -> str:
    """run_setting.py guidance options of the method's lowest mean FID (ties: first listed)."""
    s = best_group(groups, method)["guidance"]
    opts = [f"--guidance-scale {s['guidance_scale']!r}", f"--guidance-scale-pow {s['guidance_scale_pow']!r}",
            f"--softcfg-strength {s['softcfg_strength']!r}", f"--step-norm {str(s['step_norm']).lower()}"]
    return " ".join(opts)


def write_csv(groups: list, path: Path) -> None:
    guidance_keys = sorted({k for g in groups for k in g["guidance"]})
    header = (["model", "method", "smoke", "note", "num_samples", "n_seeds", "seeds"] + guidance_keys
              + [f"{k}_{s}" for k, _, _ in METRICS for s in ("mean", "std", "boot_std")]
              + [f"delta_fid_{s}" for s in ("mean", "std", "ci_low", "ci_high", "p_value")]
              + ["git_commits", "inception_sha256"])
    atomic_write(path, lambda tmp: _write_csv_rows(tmp, groups, header, guidance_keys))


def _write_csv_rows(tmp: Path, groups: list, header: list, guidance_keys: list) -> None:
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for g in groups:
            stats = [v for k, _, _ in METRICS for v in (*g["metrics"][k][:2], g["boot_std"][k])]
            delta = g.get("delta_fid") or {}
            stats += [delta.get(s) for s in ("delta", "std", "ci_low", "ci_high", "p_value")]
            note = "SMOKE - NOT a real FID" if g["smoke"] else ""
            w.writerow([g["model"], g["method"], g["smoke"], note, g["num_samples"], len(g["seeds"]),
                        " ".join(map(str, g["seeds"]))] + [g["guidance"].get(k, "") for k in guidance_keys]
                       + ["" if v is None else repr(v) for v in stats]
                       + [" ".join(g["git_commits"]), " ".join(g["inception"])])


@exit_on_error()  # bad input: `error: ...` on stderr, exit status 2
def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="result folders, e.g. results/table1_alitok")
    p.add_argument("--out", help="output prefix (default: FIRST_FOLDER/results -> .md and .csv)")
    p.add_argument("--title", help="table heading (default: the folder name)")
    p.add_argument("--baseline", metavar="METHOD", help="add paired FID deltas of every row to this method's rows")
    p.add_argument("--bootstrap", type=int, default=int(os.environ.get("BOOTSTRAP") or 200),
                   help="resamples of each paired comparison [BOOTSTRAP] (default 200)")
    p.add_argument("--device", default=os.environ.get("DEVICE") or "auto", help="[DEVICE] for the comparisons")
    p.add_argument("--best", metavar="METHOD", help="only print the options of METHOD's lowest-FID setting")
    p.add_argument("--search-summary", action="store_true",
                   help="only print the best CFG and SoftCFG points, their difference and the noise floor")
    args = p.parse_args(argv)
    rows = load_rows(args.folders)
    groups = summarize(rows)
    if args.best:
        print(best_setting(groups, args.best))
        return 0
    if args.search_summary:
        print(search_summary(groups), end="")
        return 0
    if args.baseline:
        add_paired_deltas(groups, Path(args.folders[0]), args.baseline, args.bootstrap, args.device)
    prefix = Path(args.out) if args.out else Path(args.folders[0]) / "results"
    title = args.title or Path(args.folders[0]).resolve().name
    md = to_markdown(groups, title + (" [SMOKE - NOT a real FID]" if any(g["smoke"] for g in groups) else ""),
                     args.baseline)
    atomic_write(Path(f"{prefix}.md"), lambda tmp: tmp.write_text(md))
    write_csv(groups, Path(f"{prefix}.csv"))
    print(md)
    print(f"wrote {prefix}.md and {prefix}.csv ({len(rows)} rows, {len(groups)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
