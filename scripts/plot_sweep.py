#!/usr/bin/env python
"""FID and IS against the guidance scale, CFG vs SoftCFG, from a sweep's rows.

    python scripts/plot_sweep.py results/sweep_alitok_xl [--out sweep.png]

One line per (model, method, SoftCFG strength, schedule power k); points are the mean over
seeds; error bars are the sample std over seeds when there are several, else one run's
bootstrap std (the evaluator's --bootstrap). SMOKE rows are labelled in the title, the
legend and the PNG's metadata.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect_results import load_rows, summarize  # noqa: E402

from softcfg_patch.errors import SoftCFGError, exit_on_error  # noqa: E402 (collect_results put the repo on sys.path)
from softcfg_patch.files import atomic_write  # noqa: E402

PANELS = (("fid", "FID (lower is better)"), ("inception_score", "Inception Score (higher is better)"))


def line_label(g: dict) -> str:
    alpha = g["guidance"]["softcfg_strength"]
    kind = f"SoftCFG α={alpha:g}" if alpha > 0 else "CFG"
    return f"{g['model']} {kind}, k={g['guidance']['guidance_scale_pow']:g}" + (" [SMOKE]" if g["smoke"] else "")


def plot(groups: list, out: Path) -> Path:
    """Draw both panels and save atomically; returns `out`."""
    lines: dict = {}
    for g in groups:
        if g["guidance"]["guidance_scale"] > 0:  # the unguided baseline has no scale axis
            lines.setdefault(line_label(g), []).append(g)
    if not lines:
        raise SoftCFGError("no guided rows to plot (a sweep needs guidance_scale > 0)")
    smoke = any(g["smoke"] for g in groups)
    title = " / ".join(sorted({g["model"] for g in groups})) + " guidance sweep"
    if smoke:
        title += "\nSMOKE: tiny models, random Inception - NOT a real FID"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, ylabel) in zip(axes, PANELS):
        for label, members in sorted(lines.items()):
            members = sorted(members, key=lambda g: g["guidance"]["guidance_scale"])
            xs = [g["guidance"]["guidance_scale"] for g in members]
            stats = [g["metrics"][metric] for g in members]
            ys = [m for m, _, _ in stats]
            err = [s if s is not None else (g["boot_std"][metric] or 0.0) for g, (_, s, _) in zip(members, stats)]
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=3, label=label,
                        linestyle="-" if "SoftCFG" in label else "--")
        ax.set_xlabel("guidance scale γ")
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False)  # show the values themselves
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, color="red" if smoke else "black")
    fig.tight_layout()
    try:  # the temporary name has no image suffix: say the format
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:] or "png", dpi=120,
                                                  metadata={"Title": title.replace("\n", " - ")}))
    finally:
        plt.close(fig)
    return out


@exit_on_error()  # bad input: `error: ...` on stderr, exit status 2
def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="sweep result folders, e.g. results/sweep_alitok_xl")
    p.add_argument("--out", help="image file (default: FIRST_FOLDER/sweep.png)")
    args = p.parse_args(argv)
    rows = load_rows(args.folders, what="scripts/sweep.sh")
    out = plot(summarize(rows), Path(args.out) if args.out else Path(args.folders[0]) / "sweep.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
