"""The embedded demo: plain CFG vs SoftCFG, end to end, on real data, with no downloads.

    python -m demo                      # shipped weights, under a minute on 2 CPU cores
    python -m demo --quick              # a few samples per setting (smoke test)
    python -m demo --retrain            # train generator + classifier from scratch first

A small AliTok ARModel (configs/digits.yaml) trained on sklearn's bundled UCI digits
samples every class with no guidance, CFG and SoftCFG (Step Normalization on and off)
over a grid of guidance scales, all through `softcfg_patch.generate`, the same code
path as ImageNet. A digits classifier trained on the real images is the evaluator:
class accuracy, Frechet distance and precision/recall of its features (the project's
evaluator functions), and per-class pixel diversity relative to real digits.

Every Frechet distance comes with its bootstrap std, and each SoftCFG row with its paired
difference to the CFG row of the same scale (same labels and seed) and a 95 % interval.

Writes to --out: results.json, grid_<setting>.png per setting (captioned with the setting),
comparison.png and guidance_sweep.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python demo/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from tqdm import tqdm

import softcfg_patch as sp
from alitok.model import ARModel
from demo import digits
from softcfg_patch.errors import ConfigError, exit_on_error
from evaluations.metrics import bootstrap, frechet_distance, paired_bootstrap, precision_recall, statistics

NUM_RESAMPLES = 100  # bootstrap resamples behind every Frechet interval


# -- settings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    name: str        # file-name safe id, e.g. "softcfg_sn_g3"
    method: str      # "none" | "cfg" | "softcfg" | "softcfg_nosn"
    scale: float     # guidance scale gamma (0 = no guidance)
    guidance: sp.Guidance


METHOD_LABELS = {"none": "no guidance", "cfg": "CFG", "softcfg": "SoftCFG (step norm)",
                 "softcfg_nosn": "SoftCFG (no step norm)"}


def build_settings(demo_cfg: DictConfig, scales: list[float],
                   scale_pow: float | None = None) -> list[Setting]:
    """No guidance, then CFG / SoftCFG with and without Step Normalization per scale."""
    pow_ = demo_cfg.guidance_scale_pow if scale_pow is None else scale_pow
    common = dict(guidance_scale_pow=pow_,
                  randomize_temperature=demo_cfg.randomize_temperature)
    alpha = demo_cfg.softcfg_strength
    out = [Setting("none", "none", 0.0, sp.Guidance(guidance_scale=0.0, **common))]
    for s in scales:
        tag = f"g{s:g}".replace(".", "p")
        out += [Setting(f"cfg_{tag}", "cfg", s, sp.Guidance(guidance_scale=s, **common)),
                Setting(f"softcfg_sn_{tag}", "softcfg", s, sp.Guidance(
                    guidance_scale=s, softcfg_strength=alpha, step_norm=True, **common)),
                Setting(f"softcfg_nosn_{tag}", "softcfg_nosn", s, sp.Guidance(
                    guidance_scale=s, softcfg_strength=alpha, step_norm=False, **common))]
    return out


# -- metrics -------------------------------------------------------------------------------

def class_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples the classifier assigns to their conditioning label."""
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all unordered pairs of rows of x [n, d] (n >= 2)."""
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)  # clamp rounding below 0
    iu = np.triu_indices(len(x), k=1)
    return float(np.sqrt(d2[iu]).mean())


def per_class_diversity(pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean pairwise pixel distance within each class, [num_classes]."""
    return np.array([mean_pairwise_distance(pixels[labels == c]) for c in range(digits.NUM_CLASSES)])


@dataclass
class Reference:
    """What every setting is compared to: the held-out real digits."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    diversity: np.ndarray  # per class


def make_reference(clf: digits.DigitClassifier, tokens: torch.Tensor, labels: torch.Tensor) -> Reference:
    feats = digits.embed(clf, tokens)
    mu, sigma = statistics(feats)
    div = per_class_diversity(digits.to_pixels(tokens).double().numpy(), labels.numpy())
    return Reference(mu, sigma, feats, div)


def frechet(mu: np.ndarray, sigma: np.ndarray, ref: Reference) -> float:
    """The evaluator's Frechet distance, sample first as in ADM. The "eigh" trace is the
    same quantity, but defined for the singular covariances of a few dozen samples
    (--quick) and of dead ReLU features, where sqrtm can fail."""
    return frechet_distance(mu, sigma, ref.mu, ref.sigma, method="eigh")


def manifold_precision_recall(real: np.ndarray, samples: np.ndarray) -> tuple[float, float]:
    """The evaluator's ADM manifold estimator (k = 3): precision = fraction of samples
    inside the real manifold, recall = fraction of real digits inside the samples' one."""
    return precision_recall(real, samples, k=3)


def frechet_std(feats: np.ndarray, ref: Reference, seed: int) -> float:
    """Bootstrap std of the Frechet distance (samples resampled, the real digits fixed)."""
    return bootstrap({"mu": ref.mu, "sigma": ref.sigma}, {"pool": feats}, NUM_RESAMPLES, seed)["fid"]["std"]


def paired_frechet_delta(cfg_feats: np.ndarray, soft_feats: np.ndarray, ref: Reference, seed: int) -> dict:
    """SoftCFG minus CFG Frechet distance, paired row by row (same labels and seed), with its
    95 % interval and p-value (evaluations.metrics.paired_bootstrap)."""
    d = paired_bootstrap({"mu": ref.mu, "sigma": ref.sigma}, {"pool": cfg_feats}, {"pool": soft_feats},
                         NUM_RESAMPLES, seed)["fid"]
    return {k: d[k] for k in ("delta", "std", "ci_low", "ci_high", "p_value")}


def evaluate(clf: digits.DigitClassifier, tokens: torch.Tensor, labels: torch.Tensor, ref: Reference,
             seed: int = 0, feats: np.ndarray | None = None) -> dict:
    """All metrics of one set of samples against the held-out real digits (`feats`: their
    classifier features, if already computed)."""
    feats = digits.embed(clf, tokens) if feats is None else feats
    mu, sigma = statistics(feats)
    precision, recall = manifold_precision_recall(ref.features, feats)
    div = per_class_diversity(digits.to_pixels(tokens).double().numpy(), labels.numpy())
    return {"accuracy": class_accuracy(digits.predict(clf, tokens).numpy(), labels.numpy()),
            "frechet": frechet(mu, sigma, ref), "frechet_std": frechet_std(feats, ref, seed),
            "precision": precision, "recall": recall,
            "diversity": float(np.mean(div / ref.diversity)),
            "diversity_per_class": (div / ref.diversity).round(4).tolist()}


# -- pictures --------------------------------------------------------------------------------

CELL, GAP = 48, 4  # each 8x8 digit is upscaled 6x
CAPTION_H = 28      # two lines of PIL's default font above every grid


def digit_tiles(tokens: torch.Tensor) -> np.ndarray:
    """Tokens [n, 64] -> uint8 tiles [n, CELL, CELL], dark ink on white like the UCI scans."""
    img = 255 - (tokens.view(-1, 8, 8).numpy() * 255 // (digits.NUM_LEVELS - 1))
    return np.kron(img, np.ones((CELL // 8, CELL // 8), dtype=np.int64)).astype(np.uint8)


def grid_image(tokens: torch.Tensor, per_class: int, columns: int, caption: str = "") -> Image.Image:
    """10 rows (classes) x `columns` samples from class-major tokens [10 * per_class, 64], under
    a caption band (up to two lines, e.g. the setting) that is also the PNG's Title."""
    tiles = digit_tiles(tokens).reshape(digits.NUM_CLASSES, per_class, CELL, CELL)[:, :columns]
    top = CAPTION_H if caption else 0
    h = top + digits.NUM_CLASSES * (CELL + GAP) + GAP
    w = columns * (CELL + GAP) + GAP
    canvas = np.full((h, w), 160, dtype=np.uint8)
    canvas[:top] = 255
    for r in range(digits.NUM_CLASSES):
        for c in range(tiles.shape[1]):
            y, x = top + GAP + r * (CELL + GAP), GAP + c * (CELL + GAP)
            canvas[y:y + CELL, x:x + CELL] = tiles[r, c]
    image = Image.fromarray(canvas)
    if caption:
        ImageDraw.Draw(image).multiline_text((3, 2), caption, fill=0, spacing=2)
        image.info["Title"] = caption.replace("\n", " - ")
    return image


def caption(s: Setting, seed: int) -> str:
    """What a grid shows, in the image: method, then gamma / k / alpha and the seed."""
    g = s.guidance
    if s.method == "none":
        return f"{METHOD_LABELS['none']}\nseed={seed}"
    alpha = f" alpha={g.softcfg_strength:g}" if s.method != "cfg" else ""
    return f"{METHOD_LABELS[s.method]}\nscale={g.guidance_scale:g} k={g.guidance_scale_pow:g}{alpha} seed={seed}"


def save_png(image: Image.Image, path: Path) -> None:
    """PNG with the caption as its Title text chunk."""
    from PIL import PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    if "Title" in image.info:
        meta.add_text("Title", image.info["Title"])
    image.save(path, pnginfo=meta)


def comparison_image(panels: dict[str, Image.Image]) -> Image.Image:
    """Grids side by side with a title above each."""
    title_h = 18
    width = sum(p.width for p in panels.values()) + GAP * (len(panels) - 1)
    height = max(p.height for p in panels.values()) + title_h
    out = Image.new("L", (width, height), 255)
    draw, x = ImageDraw.Draw(out), 0
    for title, panel in panels.items():
        draw.text((x + 4, 3), title, fill=0)
        out.paste(panel, (x, title_h))
        x += panel.width + GAP
    return out


def plot_sweep(rows: list[dict], baseline: dict, scale_pow: float, path: Path) -> None:
    """Frechet distance and accuracy vs guidance scale, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("frechet", "accuracy"), ("Frechet distance (lower is better)",
                                                                "class accuracy")):
        for method in ("cfg", "softcfg", "softcfg_nosn"):
            pts = [(r["scale"], r[key], r.get(f"{key}_std", 0.0)) for r in rows if r["method"] == method]
            xs, ys, errs = zip(*pts)  # error bars: the bootstrap std of the Frechet distance
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=METHOD_LABELS[method])
        none = next(r for r in rows if r["method"] == "none")
        ax.axhline(none[key], color="gray", ls="--", label="no guidance")
        ax.axhline(baseline[key], color="black", ls=":", label="real digits (train split)")
        ax.set_xlabel(f"guidance scale gamma (schedule power k = {scale_pow:g})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Digits: CFG vs SoftCFG")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the table -------------------------------------------------------------------------------

def delta_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['delta']:+.2f} ({d['ci_low']:+.2f} to {d['ci_high']:+.2f})"


def markdown_table(rows: list[dict]) -> str:
    head = ("| setting | scale | accuracy | Frechet ± std | Frechet vs CFG, paired (95% CI) | precision | recall "
            "| diversity |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scale = "-" if r["method"] in ("none", "real") else f"{r['scale']:g}"
        lines.append(f"| {r['label']} | {scale} | {r['accuracy']:.3f} | {r['frechet']:.2f} ± {r['frechet_std']:.2f} "
                     f"| {delta_cell(r.get('frechet_vs_cfg'))} | {r['precision']:.3f} | {r['recall']:.3f} "
                     f"| {r['diversity']:.3f} |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out/)")
    p.add_argument("--samples-per-class", type=int, default=None,
                   help="samples per class and setting (default: configs/digits.yaml, 50)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: config, 0)")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="guidance scales (default: config, 1.5 3 5)")
    p.add_argument("--scale-pow", type=float, default=None,
                   help="k of the guidance schedule (default: config, 1 = cosine ramp; 0 = constant)")
    p.add_argument("--retrain", action="store_true",
                   help="train generator + classifier from scratch into OUT/weights first")
    p.add_argument("--quick", action="store_true", help="4 samples per class (for tests)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model gains little from more, and "
                        "one thread makes the numbers independent of the core count)")
    p.add_argument("--config", default=str(digits.CONFIG_PATH))
    args = p.parse_args(argv)
    if args.samples_per_class is not None and args.samples_per_class < 2:
        raise ConfigError(f"--samples-per-class must be at least 2 (diversity needs pairs), "
                          f"got {args.samples_per_class}")
    bad = [s for s in args.scales or [] if not (s > 0 and np.isfinite(s))]
    if bad:
        raise ConfigError(f"--scales must be positive guidance scales, got {bad[0]:g} (no guidance, scale 0, "
                          f"is always included); e.g. --scales 1.5 3 5")
    if args.scale_pow is not None and not (args.scale_pow >= 0 and np.isfinite(args.scale_pow)):
        raise ConfigError(f"--scale-pow must be >= 0 (0 = constant scale), got {args.scale_pow:g}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the results (it is created if missing)")
    return args


def load_models(cfg: DictConfig, args: argparse.Namespace, out: Path
                ) -> tuple[ARModel, digits.DigitClassifier, Path]:
    """(generator, classifier, weights folder): the shipped weights, or fresh ones with --retrain."""
    if not args.retrain:
        return digits.load_generator(cfg), digits.load_classifier(cfg), digits.WEIGHTS_DIR
    weights = out / "weights"
    print(f"retraining from scratch into {weights} (python -m demo.digits --out {weights})")
    digits.train_all(cfg, weights)
    torch.set_num_threads(args.threads)  # training pins its own thread count
    return digits.load_generator(cfg, weights), digits.load_classifier(cfg, weights), weights


def real_baseline(clf: digits.DigitClassifier, split: digits.DigitsSplit, per_class: int,
                  ref: Reference, seed: int) -> dict:
    """The same metrics for real training digits: roughly what a perfect generator scores."""
    rng = np.random.default_rng(seed)
    labels = split.train_labels.numpy()
    per_class = min(per_class, int(np.bincount(labels).min()))
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                          for c in range(digits.NUM_CLASSES)])
    return evaluate(clf, split.train_tokens[idx], split.train_labels[idx], ref, seed)


def sweep(model: ARModel, clf: digits.DigitClassifier, ref: Reference, settings: list[Setting],
          per_class: int, seed: int, batch_size: int, out: Path) -> tuple[list[dict], dict[str, Image.Image]]:
    """Sample and evaluate every setting (same seed for each, so they share their noise);
    save each grid and keep the ones for comparison.png."""
    labels = digits.class_labels(per_class)
    top = max(s.scale for s in settings)
    rows, panels, feats = [], {}, {}
    for s in tqdm(settings, desc="sample + evaluate"):
        tokens = digits.sample(model, labels, s.guidance, seed, batch_size)
        grid = grid_image(tokens, per_class, min(per_class, 10), caption(s, seed))
        save_png(grid, out / f"grid_{s.name}.png")
        if s.method == "none" or (s.scale == top and s.method in ("cfg", "softcfg")):
            panels[METHOD_LABELS[s.method] + (f" {s.scale:g}" if s.scale else "")] = grid
        feats[s.name] = digits.embed(clf, tokens)
        rows.append({"setting": s.name, "method": s.method, "label": METHOD_LABELS[s.method],
                     "scale": s.scale, "guidance": s.guidance.to_dict(),
                     **evaluate(clf, tokens, labels, ref, seed, feats[s.name])})
    by_key = {(r["method"], r["scale"]): r for r in rows}
    for r in rows:  # same labels and seed as the CFG row of that scale: a paired comparison
        cfg = by_key.get(("cfg", r["scale"]))
        if r["method"].startswith("softcfg") and cfg is not None:
            r["frechet_vs_cfg"] = paired_frechet_delta(feats[cfg["setting"]], feats[r["setting"]], ref, seed)
    return rows, panels


def real_grid(split: digits.DigitsSplit, columns: int) -> Image.Image:
    """The first `columns` held-out digits of every class."""
    idx = torch.cat([torch.nonzero(split.test_labels == c)[:columns, 0] for c in range(digits.NUM_CLASSES)])
    return grid_image(split.test_tokens[idx], columns, columns)


@exit_on_error()  # a missing or broken weight file: `error: ...`, exit status 2
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    cfg = digits.load_config(args.config)
    per_class = args.samples_per_class or (4 if args.quick else cfg.demo.samples_per_class)
    seed = cfg.demo.seed if args.seed is None else args.seed
    scales = args.scales or list(cfg.demo.guidance_scales)
    scale_pow = cfg.demo.guidance_scale_pow if args.scale_pow is None else args.scale_pow
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder --out {out} ({err.strerror}); choose another folder")

    model, clf, weights = load_models(cfg, args, out)
    split = digits.load_split(cfg)
    ref = make_reference(clf, split.test_tokens, split.test_labels)
    baseline = real_baseline(clf, split, per_class, ref, seed)
    settings = build_settings(cfg.demo, scales, scale_pow)
    rows, panels = sweep(model, clf, ref, settings, per_class, seed, cfg.demo.batch_size, out)

    panels = {"real (held-out)": real_grid(split, min(per_class, 10)), **panels}
    comparison_image(panels).save(out / "comparison.png")
    plot_sweep(rows, baseline, scale_pow, out / "guidance_sweep.png")
    real_row = {"setting": "real", "method": "real", "label": "real digits (train split)",
                "scale": 0.0, **baseline}
    table = markdown_table([real_row] + rows)
    result = {"samples_per_class": per_class, "seed": seed, "scales": scales, "scale_pow": scale_pow,
              "weights": str(weights),
              "reference": f"held-out test split ({len(split.test_labels)} real digits)",
              "real_train_split": baseline, "settings": rows,
              "seconds": round(time.time() - start, 1), "table": table}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table)
    print(f"\nwrote {out}/results.json, grid_*.png, comparison.png, guidance_sweep.png "
          f"in {result['seconds']:.0f} s")
    return result


def command() -> None:
    """The `softcfg-demo` console script (the same as `python -m demo`)."""
    main()


if __name__ == "__main__":
    command()
