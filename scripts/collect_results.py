#!/usr/bin/env python
"""Turn result rows (scripts/run_setting.py) into the paper's table: markdown and CSV.

    python scripts/collect_results.py results/table1_alitok [more folders ...] [--out PREFIX]

Reads every FOLDER/rows/*.json (or FOLDER/*.json), groups rows that differ only in the seed,
and writes PREFIX.md and PREFIX.csv (default: FIRST_FOLDER/results). Each metric is shown as
mean ± sample standard deviation (ddof 1) over the seeds, with the number of seeds, so a
0.05 FID gap can be compared with seed noise. SMOKE rows are labelled in every output.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from softcfg_patch.run import registry  # noqa: E402
from softcfg_patch.run.output import atomic_write  # noqa: E402

METRICS = (("fid", "FID", 3), ("inception_score", "IS", 1), ("sfid", "sFID", 3),
           ("precision", "Precision", 3), ("recall", "Recall", 3))  # (key, column, decimals)
REQUIRED = ("model", "method", "smoke", "guidance", "seed", "num_samples", "metrics", "git_commit")
SMOKE_BANNER = ("> **SMOKE run** - tiny golden models, a random reference batch and a randomly "
                "initialised Inception network: these are **NOT real FID / IS numbers**.")


def load_rows(folders: Iterable) -> list:
    """Every row json under the folders; a broken row is an error naming the file."""
    rows = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a folder of result rows (expected e.g. results/table1_alitok)")
        files = sorted((folder / "rows").glob("*.json")) or sorted(folder.glob("*.json"))
        for path in files:
            try:
                row = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise SystemExit(f"error: cannot read row {path}: {err}; delete it and rerun its setting")
            lacking = [k for k in REQUIRED if k not in row]
            if lacking:
                raise SystemExit(f"error: row {path} lacks {lacking}; delete it and rerun its setting")
            rows.append(row)
    return rows


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
            "git_commits": sorted({r["git_commit"] for r in members}),
            "inception": sorted({str(r.get("inception_weights", {}).get("sha256")) for r in members}),
        })
    out.sort(key=lambda g: (model_rank(g["model"]), g["order"], g["method"],
                            g["guidance"]["guidance_scale"], g["guidance"]["guidance_scale_pow"]))
    return out


def settings_text(g: dict) -> str:
    """The guidance settings in a few symbols: gamma, k, alpha and the SoftCFG options."""
    s = g["guidance"]
    if s["guidance_scale"] == 0:
        parts = ["γ=0 (unguided)"]
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


def to_markdown(groups: list, title: str) -> str:
    lines = [f"# {title}", ""]
    if any(g["smoke"] for g in groups):
        lines += [SMOKE_BANNER, ""]
    lines += ["| model | method | " + " | ".join(c for _, c, _ in METRICS) + " | seeds | settings |",
              "|---|---|" + "---:|" * len(METRICS) + "---|---|"]
    for g in groups:
        model = g["model"] + (" (SMOKE)" if g["smoke"] else "")
        metrics = " | ".join(cell(g["metrics"][k], d) for k, _, d in METRICS)
        lines.append(f"| {model} | {g['method']} | {metrics} | {len(g['seeds'])} | {settings_text(g)} |")
    nums = sorted({g["num_samples"] for g in groups})
    commits = sorted({c for g in groups for c in g["git_commits"]})
    lines += ["", f"Mean ± sample std (ddof 1) over the seeds; {', '.join(map(str, nums))} samples per run; "
                  f"code {', '.join(c[:12] + ('-dirty' if c.endswith('-dirty') else '') for c in commits)}."]
    if reference_fids(groups):
        lines += ["", "Published FID (upstream README, CFG at the upstream setting, 50k samples): "
                      + ", ".join(reference_fids(groups)) + "."]
    return "\n".join(lines) + "\n"


def write_csv(groups: list, path: Path) -> None:
    guidance_keys = sorted({k for g in groups for k in g["guidance"]})
    header = (["model", "method", "smoke", "note", "num_samples", "n_seeds", "seeds"] + guidance_keys
              + [f"{k}_{s}" for k, _, _ in METRICS for s in ("mean", "std")] + ["git_commits", "inception_sha256"])
    atomic_write(path, lambda tmp: _write_csv_rows(tmp, groups, header, guidance_keys))


def _write_csv_rows(tmp: Path, groups: list, header: list, guidance_keys: list) -> None:
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for g in groups:
            stats = [v for k, _, _ in METRICS for v in g["metrics"][k][:2]]
            note = "SMOKE - NOT a real FID" if g["smoke"] else ""
            w.writerow([g["model"], g["method"], g["smoke"], note, g["num_samples"], len(g["seeds"]),
                        " ".join(map(str, g["seeds"]))] + [g["guidance"].get(k, "") for k in guidance_keys]
                       + ["" if v is None else repr(v) for v in stats]
                       + [" ".join(g["git_commits"]), " ".join(g["inception"])])


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="result folders, e.g. results/table1_alitok")
    p.add_argument("--out", help="output prefix (default: FIRST_FOLDER/results -> .md and .csv)")
    p.add_argument("--title", help="table heading (default: the folder name)")
    args = p.parse_args(argv)
    rows = load_rows(args.folders)
    if not rows:
        print(f"error: no result rows in {', '.join(args.folders)} (run a table script first)", file=sys.stderr)
        return 2
    groups = summarize(rows)
    prefix = Path(args.out) if args.out else Path(args.folders[0]) / "results"
    title = args.title or Path(args.folders[0]).resolve().name
    md = to_markdown(groups, title + (" [SMOKE - NOT a real FID]" if any(g["smoke"] for g in groups) else ""))
    atomic_write(Path(f"{prefix}.md"), lambda tmp: tmp.write_text(md))
    write_csv(groups, Path(f"{prefix}.csv"))
    print(md)
    print(f"wrote {prefix}.md and {prefix}.csv ({len(rows)} rows, {len(groups)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
