"""Time whole sampling runs, route by route, in one process: where does a run's time go
besides generating and decoding, and how many bytes does it leave per image?

    python benchmarks/bench_pipeline.py                                  # tiny golden AliTok, < 2 min on CPU
    python benchmarks/bench_pipeline.py --size alitok_b --num-images 4   # AliTok-B architecture, random weights
    python benchmarks/bench_pipeline.py --size alitok_xl --device cuda --num-images 250 --batch 125
    python benchmarks/bench_pipeline.py --routes png,shards --num-images 64 --batch 16   # (a) alone

Routes (each one `softcfg_patch.run.runner.main` in this process, into a fresh folder):

    bare    no runner: the runner's own generate + decode + FID Inception forward per batch, in
            the runner's order (same labels, seeds, guidance), nothing written: the least work
            any run that scores its images can do
    png     sample.images=png: a PNG per image, then <output_dir>.npz read back from the PNGs
    shards  sample.images=shards: the uint8 images in each batch's shard, then <output_dir>.npz
            streamed from the shards
    none    sample.images=none + sample.fid_reference: the Inception activations stored in the
            shards while sampling, <output_dir>.metrics.json at the end; no image kept

Stages are timed by wrapping the runner's functions (synchronising CUDA around each):
generate = `runner.generate`, decode = the family's image decoder, inception =
`Evaluation.activations`, write = `runner.save_shard` + `output.save_png`, assemble =
`output.write_images_npz` (reading the PNGs / shards back included), metrics =
`Evaluation.finish`, other = the rest of the sampling loop and of the final step (labels,
host copies, ledger, ownership checks). A route's run time is `sample_batches` +
`write_outputs`; `wall` adds what comes before (config checks, lock, manifest hashing,
loading Inception). The generator and decoder are built once before the routes (`setup_s`,
not in any route), run once untimed (8 decode steps, one image), and shared by every route.

Inputs are made in the work folder, nothing is downloaded: a random uint8 reference batch
[8, 256, 256, 3] and the seeded random FID Inception recipe (evaluations.inception.
random_weights), so metric values are meaningless. `tiny` is the golden tiny AliTok
(tests/configs/alitok_tiny.yaml); alitok_b/l/xl are the configs' architectures with random
weights (std 0.02 generator, default-initialised tokenizer). Before timing, one untimed
4-image run of the tiny config (png + evaluation) warms every code path and the reference's
activation cache (as after a first evaluation). FIDs use `--fid-method eigh` by default (the
same trace as ADM's sqrtm, seconds instead of a minute on CPU).

`--repeats R` makes R passes over the routes, the order alternating (drift cancels); each
route shows its pass of median run time and each ratio is its median over the passes (default
3 passes at tiny size, 1 otherwise).

Reading the output: the table gives seconds per image by stage (`total` = the run time),
images/s of the run and bytes on disk per image (PNG files, shards, the image npz, all files
including the manifest and metrics). Then three ratios and their targets:

    (a) png write+assemble over shards write+assemble: how much faster the shard route gets
        the images into <output_dir>.npz (target >= 10x)
    (b) shards: the run's time outside generate+decode, as a share of it (target <= 2 %,
        stated for AliTok-B size, where generating dominates; at tiny size it is looser)
    (c) none+evaluation run time over the bare route's (target <= 1.1); printed too without
        the metrics' own cost per run (2048-d statistics and their square roots: large beside
        a few images, small beside 50k)

Per-file costs (a shard, its rename, the npz's header) are paid per batch and per run, so
(a) grows with --batch and --num-images. A shared machine is noisy (generate varies by ~10 %
between passes on 2 busy cores, which moves (c) as much): compare routes of one invocation,
and pass --threads 1 when another job shares the cores.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io as textio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from unittest import mock

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softcfg_patch.guidance import Guidance  # noqa: E402
from softcfg_patch.run import evaluation as ev  # noqa: E402
from softcfg_patch.run import output as io  # noqa: E402
from softcfg_patch.run import registry, runner  # noqa: E402

ROUTES = ("bare", "png", "shards", "none")
STAGES = ("generate", "decode", "write", "assemble", "inception", "metrics", "other")
SIZES = ("tiny", "alitok_b", "alitok_l", "alitok_xl")
TINY_CONFIG = "tests/configs/alitok_tiny.yaml"
REFERENCE_IMAGES = 8
MIN_IMAGES = 4  # precision/recall (k = 3) need 4 samples
TARGETS = {"a": 10.0, "b": 0.02, "c": 1.1}


# ------------------------------------------------------------------------- timing
class Clock:
    """Seconds per stage, accumulated; CUDA is synchronised around every timed call."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, defaultdict(float)
        self.captured: dict = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, stage: str, fn: Callable) -> Callable:
        """fn, its time added to `stage` on every call."""
        def call(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[stage] += time.perf_counter() - start
        return call

    def capture(self, name: str, fn: Callable) -> Callable:
        """fn, its last result kept in `captured[name]`."""
        def call(*args, **kwargs):
            self.captured[name] = result = fn(*args, **kwargs)
            return result
        return call


@contextlib.contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    """The runner's stage functions wrapped with `clock` (restored on exit)."""
    targets = [(runner, "generate", "generate"), (runner, "save_shard", "write"), (io, "save_png", "write"),
               (io, "write_images_npz", "assemble"), (ev.Evaluation, "activations", "inception"),
               (ev.Evaluation, "finish", "metrics"), (runner, "sample_batches", "span"),
               (runner, "write_outputs", "span")]
    with contextlib.ExitStack() as stack:
        for owner, name, stage in targets:
            stack.enter_context(mock.patch.object(owner, name, clock.timed(stage, getattr(owner, name))))
        stack.enter_context(mock.patch.object(ev, "load", clock.capture("evaluation", ev.load)))
        yield


# ------------------------------------------------------------------------- models
def random_generator(family: str, config, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The generator of `config`'s architecture with N(0, 0.02) weights, built on `device`."""
    with torch.device(device):
        model = registry.get(family).resolve("generator_class")(config)
    torch.manual_seed(seed)
    for p in model.parameters():  # upstream zero-inits some heads; random weights keep sampling honest
        p.data.normal_(0, 0.02)
    return model.eval()


def random_alitok_decoder(config, device: torch.device, seed: int = 0) -> Callable:
    """tokens -> uint8 images through a default-initialised AliTok tokenizer of `config`'s sizes."""
    from alitok.tokenizer import AliTokTokenizer
    from softcfg_patch.layers import unit_to_uint8_hwc
    vq = config.model.vq_model
    sizes = {"codebook_size": vq.codebook_size, "token_size": vq.token_size,
             **dict(config.model.get("tokenizer") or {})}
    torch.manual_seed(seed)
    with torch.device(device):
        tokenizer = AliTokTokenizer(**sizes).eval()
    return lambda tokens: unit_to_uint8_hwc(tokenizer.decode_tokens(tokens))


@dataclasses.dataclass(frozen=True)
class BenchFamily(registry.ModelFamily):
    """A registry family whose loaders are given callables (cached, timed models)."""
    loaders: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def resolve(self, what: str) -> Callable:
        return self.loaders.get(what) or super().resolve(what)


class Models:
    """The generator and decoder of one size, built once (`prepare`) and shared by every route;
    building counts as `setup`, every decode as `decode` (on the clock of the route that runs)."""

    def __init__(self, size: str, device: torch.device):
        self.size, self.device, self.cache = size, device, {}
        self.clock: Optional[Clock] = None
        self.base = registry.get("alitok")

    def family(self) -> BenchFamily:
        base = {f.name: getattr(self.base, f.name) for f in dataclasses.fields(self.base)}
        return BenchFamily(**base, loaders={"load_generator": self.load_generator,
                                            "image_decoder": self.image_decoder})

    def _built(self, key: str, build: Callable) -> object:
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = build()
            self.clock.seconds["setup"] += time.perf_counter() - start
        return self.cache[key]

    def load_generator(self, config, path, source: str = "") -> torch.nn.Module:
        def build() -> torch.nn.Module:
            if self.size == "tiny":  # the golden weights, through the family's own loader
                return self.base.resolve("load_generator")(config, path, source=source).to(self.device)
            return random_generator("alitok", config, self.device)
        return self._built("generator", build)

    def prepare(self, argv: Sequence[str], warm_steps: int = 8) -> float:
        """Build both models for the config of `argv` and run them once, untimed (a few decode steps,
        one image), so that no route pays first-touch costs; returns the seconds spent building."""
        family, self.clock = self.family(), Clock(self.device)
        config = runner.checked_config(list(argv), family)  # the input paths resolved as the runner does
        paths = [OmegaConf.select(config, c.key) for c in family.checkpoints]  # generator, then decoder
        model, decode = self.load_generator(config, paths[0]), self.image_decoder(config, paths[-1], self.device)
        full, model.num_image_tokens = model.num_image_tokens, warm_steps
        try:
            tokens = runner.generate(model, torch.zeros(1, dtype=torch.long, device=self.device),
                                     Guidance.from_config(config.model.generator))
        finally:
            model.num_image_tokens = full
        decode(torch.cat([tokens, tokens.new_zeros(1, full - tokens.shape[1])], 1))
        return self.clock.seconds["setup"]

    def image_decoder(self, config, path, device, source: str = "") -> Callable:
        def build() -> Callable:
            if self.size == "tiny":
                return self.base.resolve("image_decoder")(config, path, device, source=source)
            return random_alitok_decoder(config, device)
        decode = self._built("decoder", build)
        return lambda tokens: self.clock.timed("decode", decode)(tokens)


# ------------------------------------------------------------------------- inputs
def make_inputs(work: Path, seed: int = 0) -> dict:
    """A random reference batch, the seeded random FID Inception weights and placeholder
    checkpoint files (the random-weight sizes never read them)."""
    from safetensors.torch import save_file

    from evaluations.inception import random_weights
    from softcfg_patch.files import save_npz
    work.mkdir(parents=True, exist_ok=True)
    paths = {"reference": work / "reference.npz", "inception": work / "inception-random.safetensors",
             "generator": work / "generator.random-weights", "tokenizer": work / "tokenizer.random-weights"}
    rng = np.random.default_rng(seed)
    save_npz(paths["reference"], rng.integers(0, 256, (REFERENCE_IMAGES, 256, 256, 3), dtype=np.uint8))
    save_file(random_weights(seed), paths["inception"])
    for name in ("generator", "tokenizer"):
        paths[name].write_text("placeholder: bench_pipeline.py builds this model with random weights\n")
    return paths


def route_argv(size: str, route: str, out: Path, num_images: int, batch: int, device: str, inputs: dict,
               fid_method: str) -> list[str]:
    """The runner's command line of one route."""
    config = TINY_CONFIG if size == "tiny" else f"configs/{size}.yaml"
    argv = ["--config", str(ROOT / config), f"--experiment.output_dir={out}", f"--sample.num_fid_samples={num_images}",
            f"--sample.per_proc_batch_size={batch}", f"--sample.device={device}",
            f"--sample.images={'none' if route == 'bare' else route}"]
    if size != "tiny":
        argv += [f"--experiment.generator_checkpoint={inputs['generator']}",
                 f"--experiment.tokenizer_checkpoint={inputs['tokenizer']}"]
    if route in ("none", "bare"):
        argv += [f"--sample.fid_reference={inputs['reference']}", f"--sample.inception_weights={inputs['inception']}",
                 f"--sample.fid_method={fid_method}"]
    return argv


def call_runner(argv: Sequence[str], family: "str | registry.ModelFamily", log: Path) -> None:
    """runner.main in this process, its output appended to `log`; RuntimeError if it fails."""
    buffer = textio.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            runner.main(list(argv), family)
    except SystemExit as stop:
        if stop.code:
            raise RuntimeError(f"the runner exited {stop.code}: {buffer.getvalue()[-2000:]}") from None
    finally:
        with open(log, "a") as f:
            f.write(f"$ runner.main {' '.join(argv)}\n{buffer.getvalue()}\n")


def disk_bytes(out: Path) -> dict:
    """Bytes of every file a run left: PNGs, shards, the image npz, and all of them (+ manifest, metrics)."""
    sizes = {"png": 0, "shards": 0, "npz": 0, "total": 0}
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in (Path(f"{out}.npz"),
                                                                      ev.metrics_path(out)) if p.is_file()]
    for path in files:
        size = path.stat().st_size
        kind = "png" if path.suffix == ".png" else "shards" if path.parent.name == "shards" else \
            "npz" if path == Path(f"{out}.npz") else None
        if kind:
            sizes[kind] += size
        sizes["total"] += size
    return sizes


# ------------------------------------------------------------------------- routes
def summarize(seconds: dict, run_s: float, num_images: int, wall_s: float, disk: Optional[dict]) -> dict:
    """Per-route numbers: seconds by stage (other = the run's rest), per image, shares, bytes."""
    stages = {stage: seconds.get(stage, 0.0) for stage in STAGES if stage != "other"}
    stages["other"] = run_s - sum(stages.values())
    disk = disk or {"png": 0, "shards": 0, "npz": 0, "total": 0}
    return {"seconds": stages, "run_s": run_s, "wall_s": wall_s,
            "per_image_s": {k: v / num_images for k, v in stages.items()},
            "shares": {k: v / run_s for k, v in stages.items()}, "images_per_s": num_images / run_s,
            "bytes": disk, "bytes_per_image": {k: v / num_images for k, v in disk.items()}}


def run_route(models: Models, argv: Sequence[str], out: Path, num_images: int, log: Path) -> dict:
    """One runner route into `out`, timed stage by stage."""
    clock = models.clock = Clock(models.device)
    start = time.perf_counter()
    with instrumented(clock):
        call_runner(argv, models.family(), log)
    wall = time.perf_counter() - start
    return summarize(clock.seconds, clock.seconds["span"], num_images, wall, disk_bytes(out))


def run_bare(models: Models, argv: Sequence[str], evaluation: "ev.Evaluation") -> dict:
    """The write-nothing reference: the runner's generate, decode and Inception per batch, in its
    order and with its seeds, labels, guidance and precision; no file, no metrics."""
    config = runner.checked_config(list(argv), models.family())
    s, device = config.sample, models.device
    clock = models.clock = Clock(device)
    model, decode = models.load_generator(config, None), models.image_decoder(config, None, device)  # cached
    guidance = Guidance.from_config(config.model.generator)
    plan, inception = runner.batch_plan(s.num_fid_samples, s.per_proc_batch_size), \
        clock.timed("inception", evaluation.activations)
    generate = clock.timed("generate", runner.generate)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    start = time.perf_counter()
    for k in range(len(plan)):
        labels = runner.class_labels(plan[k], model.num_classes, s.labels, s.seed, k)
        generator = torch.Generator(device=device).manual_seed(runner.batch_seed(s.seed, k))
        with autocast:
            tokens = generate(model, torch.from_numpy(labels).to(device), guidance, generator=generator,
                              compile=bool(s.compile))
            with torch.no_grad():
                images = decode(tokens)
        inception(images)
        tokens.cpu()
    run = time.perf_counter() - start
    return summarize(clock.seconds, run, s.num_fid_samples, run, None)


def warm_up(work: Path, inputs: dict, device: str, fid_method: str, log: Path) -> "ev.Evaluation":
    """One untimed tiny run of one batch of 4 images (png + evaluation; the metrics need 4): first-call
    costs, the reference's activation cache; returns its Evaluation (its network serves the bare route)."""
    clock = Clock(torch.device(device))
    argv = route_argv("tiny", "png", work / "warm-up", MIN_IMAGES, MIN_IMAGES, device, inputs, fid_method)
    argv += [f"--sample.fid_reference={inputs['reference']}", f"--sample.inception_weights={inputs['inception']}",
             f"--sample.fid_method={fid_method}"]
    with instrumented(clock):
        call_runner(argv, "alitok", log)
    return clock.captured["evaluation"]


def run_pass(models: Models, routes: Sequence[str], tag: str, setup: dict) -> dict:
    """Every route of `routes` once, in that order, into fresh folders named `<route><tag>`."""
    work, found = setup["work"], {}
    for route in routes:
        out = work / f"{route}{tag}"
        argv = route_argv(models.size, route, out, setup["num_images"], setup["batch"], str(models.device),
                          setup["inputs"], setup["fid_method"])
        found[route] = (run_bare(models, argv, setup["evaluation"]) if route == "bare"
                        else run_route(models, argv, out, setup["num_images"], setup["log"]))
    return found


def median_of(items: list, key: Callable) -> object:
    """The item whose key is the (lower) median: its numbers stay consistent with each other."""
    value = statistics.median_low([key(x) for x in items])
    return next(x for x in items if key(x) == value)


def measure(size: str = "tiny", num_images: int = 16, batch: int = 4, device: str = "cpu",
            routes: Sequence[str] = ROUTES, fid_method: str = "eigh", work: Optional[Path] = None,
            repeats: int = 1) -> dict:
    """The warm-up, then `repeats` passes over `routes` (the order alternating, so drift cancels).

    Each route reports its pass of median run time; each ratio is its median over the passes.
    """
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_pipeline-")))
        setup = {"work": work, "inputs": make_inputs(work), "log": work / "runner.log", "num_images": num_images,
                 "batch": batch, "fid_method": fid_method}
        setup["evaluation"] = warm_up(work, setup["inputs"], device, fid_method, setup["log"])
        models = Models(size, torch.device(device))
        setup_s = models.prepare(route_argv(size, routes[0], work / "prepare", num_images, batch, device,
                                            setup["inputs"], fid_method))
        passes = [run_pass(models, routes if r % 2 == 0 else routes[::-1], f"-{r}", setup) for r in range(repeats)]
    per_pass = [ratios(p) for p in passes]
    return {"size": size, "num_images": num_images, "batch": batch, "device": device, "fid_method": fid_method,
            "threads": torch.get_num_threads(), "repeats": repeats, "setup_s": setup_s,
            "routes": {route: median_of([p[route] for p in passes], lambda r: r["run_s"]) for route in routes},
            "ratios": {k: median_of([p[k] for p in per_pass], lambda r: r["value"]) for k in per_pass[0]},
            "passes": passes}


# ------------------------------------------------------------------------- report
def ratios(routes: dict) -> dict:
    """(a), (b), (c) of the module docstring, each {value, target, met, ...} (absent without its routes)."""
    out = {}
    if "png" in routes and "shards" in routes:
        png, shards = (sum(routes[r]["seconds"][k] for k in ("write", "assemble")) for r in ("png", "shards"))
        value = png / shards
        out["a"] = {"value": value, "png_s": png, "shards_s": shards, "target": TARGETS["a"],
                    "met": value >= TARGETS["a"]}
    if "shards" in routes:
        shares = routes["shards"]["shares"]
        value = 1.0 - shares["generate"] - shares["decode"]
        out["b"] = {"value": value, "target": TARGETS["b"], "met": value <= TARGETS["b"]}
    if "none" in routes and "bare" in routes:
        none, bare = routes["none"], routes["bare"]["run_s"]
        value = none["run_s"] / bare
        out["c"] = {"value": value, "target": TARGETS["c"], "met": value <= TARGETS["c"],
                    "without_metrics": (none["run_s"] - none["seconds"]["metrics"]) / bare,
                    "metrics_s": none["seconds"]["metrics"]}
    return out


def table(result: dict) -> str:
    head = (f"{result['size']}, {result['num_images']} images, batch {result['batch']}, {result['device']}, "
            f"{result['threads']} thread(s), fid_method {result['fid_method']}, "
            f"median of {result['repeats']} pass(es); models built once in {result['setup_s']:.1f} s (not counted)\n"
            f"seconds per image by stage; bytes on disk per image\n")
    cols = f"{'route':7s} {'images/s':>9s} " + " ".join(f"{s:>9s}" for s in STAGES) + f" {'total':>9s}" + \
        "".join(f" {c:>9s}" for c in ("png B", "shards B", "npz B", "all B"))
    rows = [cols]
    for name, r in result["routes"].items():
        rows.append(f"{name:7s} {r['images_per_s']:9.3f} " + " ".join(f"{r['per_image_s'][s]:9.4f}" for s in STAGES)
                    + f" {r['run_s'] / result['num_images']:9.4f}"
                    + "".join(f" {r['bytes_per_image'][k]:9.0f}" for k in ("png", "shards", "npz", "total")))
    return head + "\n".join(rows)


def ratio_lines(result: dict) -> list[str]:
    found, lines = result["ratios"], []
    verdict = lambda r: "met" if r["met"] else "NOT met"  # noqa: E731
    if "a" in found:
        a = found["a"]
        lines.append(f"(a) write+assemble, png over shards: {a['png_s']:.4f} s / {a['shards_s']:.4f} s = "
                     f"{a['value']:.1f}x (target >= {a['target']:.0f}x: {verdict(a)})")
    if "b" in found:
        b = found["b"]
        note = "" if result["size"] != "tiny" else "; the target is stated for AliTok-B size"
        lines.append(f"(b) shards: time outside generate+decode = {100 * b['value']:.2f} % of the run "
                     f"(target <= {100 * b['target']:.0f} %: {verdict(b)}{note})")
    if "c" in found:
        c = found["c"]
        lines.append(f"(c) none+evaluation run over bare (generate+decode+Inception): {c['value']:.3f} (target <= "
                     f"{c['target']}: {verdict(c)}); without the fixed scoring cost ({c['metrics_s']:.2f} s per "
                     f"run): {c['without_metrics']:.3f}")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: golden tiny AliTok; alitok_*: that architecture, random weights")
    parser.add_argument("--num-images", type=int, default=None, help="images per route (tiny 16, else 4)")
    parser.add_argument("--batch", type=int, default=None, help="sample.per_proc_batch_size (tiny 8, else 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, in order ({','.join(ROUTES)})")
    parser.add_argument("--repeats", type=int, default=None, help="passes over the routes (tiny 3, else 1)")
    parser.add_argument("--fid-method", choices=ev.FID_METHODS, default="eigh")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the runner's choice)")
    parser.add_argument("--workdir", default=None, help="keep every file here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    unknown = set(args.routes.split(",")) - set(ROUTES)
    if unknown:
        parser.error(f"unknown route(s) {', '.join(sorted(unknown))}; choose from {', '.join(ROUTES)}")
    if args.num_images is not None and args.num_images < MIN_IMAGES:
        parser.error(f"--num-images must be at least {MIN_IMAGES} (the metrics' precision/recall need them)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """The command line; returns what it printed, as numbers."""
    args = parse_args(argv)
    if args.threads:  # the runner keeps the current thread count when OMP_NUM_THREADS is set
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    num_images = args.num_images or (16 if args.size == "tiny" else 4)
    repeats = args.repeats or (3 if args.size == "tiny" else 1)
    batch = args.batch or (8 if args.size == "tiny" else 4)
    result = measure(args.size, num_images, batch, args.device, args.routes.split(","), args.fid_method,
                     Path(args.workdir) if args.workdir else None, repeats)
    print(table(result))
    print("\n".join(ratio_lines(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
