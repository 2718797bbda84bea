#!/usr/bin/env python
"""Sample, evaluate and record ONE guidance setting: the workhorse behind scripts/*.sh.

    python scripts/run_setting.py --table table1_alitok --model alitok_xl --method SoftCFG \
        --guidance-scale 9 --guidance-scale-pow 1.5 --softcfg-strength 1 --seed 0

0. check every input (generator and tokenizer checkpoints, reference batch, FID Inception
   weights, evaluator) and list all problems at once; `--check-only` stops here (the table
   scripts run it once per model before its first setting);
1. sample NUM_SAMPLES images with the model family's sampler, e.g. alitok/sample_imagenet.py (torch.distributed.run
   when NPROC > 1) into RESULTS/samples/<run>/;
2. evaluate against REF: with SAMPLES=none (default) or shards the sampler itself scores the
   Inception activations of every batch as it decodes it (sample.fid_reference: no PNG, no
   second pass; `shards` also keeps the images in RESULTS/samples/<run>.npz); with SAMPLES=png
   it writes PNGs and RESULTS/samples/<run>.npz, which evaluations/evaluator.py then scores;
3. write the row RESULTS/<table>/rows/<run>.json (atomically, last).

<run> is derived from the model, every guidance setting, the seed, the number of samples and
the batch size, so tables that share a setting share its samples and its evaluation.
Rerunning is cheap and safe: an existing row is skipped, a complete npz is not resampled, an
interrupted sampling resumes, a finished evaluation is reused.

SMOKE=1 swaps in the tiny golden models (tests/configs/*_tiny.yaml), 4 samples, a random
reference batch and a seeded *randomly initialised* Inception network on CPU, so every table
script runs end to end in CI. Its numbers are meaningless and every output says so.

Every option falls back to an environment variable (see --help), which is how the shell
scripts configure it.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from softcfg_patch.errors import SoftCFGError  # noqa: E402
from softcfg_patch.guidance import ALIGNMENTS, CONFIDENCES, TARGETS, Guidance, method  # noqa: E402
from softcfg_patch.run import registry  # noqa: E402
from softcfg_patch.run.config import LABELS  # noqa: E402
from softcfg_patch.files import atomic_write, save_npz  # noqa: E402

MODELS = tuple(registry.model_names())
SAMPLE_MODES = ("none", "shards", "png")

GUIDANCE_DEFAULTS = Guidance().to_dict()
# Sampling options left out of a run's digest while at their defaults (names made before
# they existed stay valid).
SAMPLING_OFF = {"top_k": 0, "top_p": 1.0, "cfg_interval": -1}
SMOKE_LABEL = "SMOKE: tiny golden model, random reference, random Inception - NOT a real FID"
SMOKE_REF_IMAGES = 8       # >= 4: the evaluator's k=3 precision/recall needs k + 1 images
SMOKE_INCEPTION_SEED = 1234  # the recipe of tests/fixtures/inception/README.md section 2

REFERENCE_SOURCE = ("VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations/README.md "
                    "(ImageNet 256x256 reference batch)")


class SettingError(SoftCFGError):
    """Bad input or a missing file; the message says how to fix it."""


# ----------------------------------------------------------------------------- options
def env(name: str, default: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(name, "")
    return value if value != "" else default


def env_flag(name: str) -> bool:
    return env(name, "0").lower() in ("1", "true", "yes", "on")


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample, evaluate and record one guidance setting (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", required=True, help="rows go to RESULTS/<table>/rows/")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--method", required=True, help="label shown in the table, e.g. CFG or SoftCFG")
    p.add_argument("--order", type=int, default=0, help="position of the setting in its table")
    p.add_argument("--seed", type=int, default=0, help="sample.seed of the sampler")
    g = p.add_argument_group("guidance (default: the model config's value)")
    choices = {"softcfg_confidence": CONFIDENCES, "softcfg_align": ALIGNMENTS, "softcfg_target": TARGETS}
    for f in fields(Guidance):  # one option per Guidance setting, typed like its default
        kind = type(f.default)
        g.add_argument("--" + f.name.replace("_", "-"), default=None, choices=choices.get(f.name),
                       type=parse_bool if kind is bool else None if kind is str else kind,
                       help="true or false" if kind is bool else None)
    e = p.add_argument_group("run (default: environment variable in brackets)")
    e.add_argument("--smoke", action="store_true", default=env_flag("SMOKE"), help="[SMOKE=1]")
    e.add_argument("--num-samples", type=int, default=env("NUM_SAMPLES"), help="[NUM_SAMPLES] 50000; SMOKE 4")
    e.add_argument("--batch", type=int, default=env("BATCH"),
                   help="[BATCH] sample.per_proc_batch_size; default the config's (SMOKE 4)")
    e.add_argument("--nproc", type=int, default=env("NPROC", "1"), help="[NPROC] processes per run")
    e.add_argument("--weights", default=env("WEIGHTS", "weights"), help="[WEIGHTS] checkpoint folder")
    e.add_argument("--ref", default=env("REF"),
                   help="[REF] reference npz; default WEIGHTS/VIRTUAL_imagenet256_labeled.npz "
                        "(SMOKE: a random one made under RESULTS/smoke/)")
    e.add_argument("--results", default=env("RESULTS"), help="[RESULTS] results/ (SMOKE: results_smoke/)")
    e.add_argument("--inception-weights", default=env("INCEPTION"),
                   help="[INCEPTION] FID Inception weights; default: a published file name in WEIGHTS, "
                        "else the evaluator's own search (SMOKE: a seeded random network)")
    e.add_argument("--evaluator", default=env("EVALUATOR", str(REPO / "evaluations" / "evaluator.py")),
                   help="[EVALUATOR] evaluator script (same CLI as evaluations/evaluator.py)")
    e.add_argument("--device", default=env("DEVICE", "auto"), help="[DEVICE] auto, cpu or cuda")
    e.add_argument("--labels", default=env("LABELS", "balanced"), choices=LABELS,
                   help="[LABELS] sample.labels: balanced (i mod 1000) or random (upstream LlamaGen's draws)")
    e.add_argument("--bootstrap", type=int, default=env("BOOTSTRAP", "100"),
                   help="[BOOTSTRAP] resamples for the row's bootstrap std and 95%% interval (evaluator --bootstrap)")
    e.add_argument("--wandb", action="store_true", default=env_flag("WANDB"), help="[WANDB=1] log to W&B")
    e.add_argument("--check-only", action="store_true",
                   help="check every input of --model (checkpoints, reference batch, Inception weights, "
                        "evaluator, wandb), list all problems and exit; samples and creates nothing")
    e.add_argument("--samples", default=env("SAMPLES", "none"), choices=SAMPLE_MODES,
                   help="[SAMPLES] none: metrics computed while sampling, no images kept (tokens and "
                        "activations stay: ~21 KB/image) | shards: the same, images kept in one npz per batch "
                        "and <run>.npz | png: PNGs and <run>.npz, then evaluations/evaluator.py (upstream's way)")
    e.add_argument("--delete-samples", action="store_true", default=env_flag("DELETE_SAMPLES"),
                   help="[DELETE_SAMPLES=1] once the row is written, delete the images: the PNGs and npz (png, "
                        "~10 GB/run) or the npz (shards); none keeps no images")
    e.add_argument("--in-process", type=parse_bool, default=env("IN_PROCESS"),
                   help="[IN_PROCESS] run the sampler and evaluator inside this process (default: "
                        "true for SMOKE on one process, else false: real runs start processes)")
    args = p.parse_args(argv)
    if args.in_process is None:
        args.in_process = args.smoke and int(args.nproc) == 1
    if args.in_process and int(args.nproc) > 1:
        p.error("--in-process/IN_PROCESS needs one process (NPROC=1): torchrun starts its own")
    args.num_samples = int(args.num_samples or (4 if args.smoke else 50000))
    args.results = Path(args.results or ("results_smoke" if args.smoke else "results")).resolve()
    if args.num_samples < 4:
        p.error(f"--num-samples/NUM_SAMPLES must be >= 4 (the evaluator's k=3 precision/recall "
                f"needs 4 images), got {args.num_samples}")
    if args.bootstrap < 10:
        p.error(f"--bootstrap/BOOTSTRAP must be >= 10 resamples, got {args.bootstrap}")
    if args.nproc < 1 or (args.batch is not None and int(args.batch) < 1):
        p.error("--nproc/NPROC and --batch/BATCH must be positive whole numbers")
    return args


# ----------------------------------------------------------------------------- settings
def config_path(model: str, smoke: bool) -> Path:
    if smoke:  # the golden tiny generator + tokenizer of the same family
        return REPO / registry.get(model).smoke_config
    return REPO / "configs" / f"{model}.yaml"


def effective_guidance(config, args: argparse.Namespace) -> dict:
    """Every guidance setting the sampler will use: defaults < config < command line."""
    gen = config.model.generator
    out = {k: gen.get(k, v) for k, v in GUIDANCE_DEFAULTS.items()}
    for key in out:
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return {k: (float(v) if isinstance(GUIDANCE_DEFAULTS[k], float) else v) for k, v in out.items()}


def method_kind(guidance: dict, model: str) -> str:
    """"noguidance", "cfg" or "softcfg": what the sampler of `model` runs (the family's rule for
    which scale is unguided: LlamaGen's 1 is, AliTok's is not)."""
    return method(Guidance(**guidance), registry.get(model))


SOFTCFG_ONLY = ("softcfg_strength", "step_norm", "softcfg_confidence", "softcfg_align",
                "softcfg_min_weight", "softcfg_target")


def unused_guidance_keys(guidance: dict, model: str) -> tuple:
    """Settings that cannot change this run's images (so runs that differ only there share samples)."""
    kind = method_kind(guidance, model)
    return (SOFTCFG_ONLY if kind != "softcfg" else ()) + (("guidance_scale_pow",) if kind == "noguidance" else ())


def sampler_guidance(guidance: dict, model: str) -> dict:
    """What the sampler is given: unused keys at their defaults, so the output folder's manifest
    is the same for every setting that shares the run (the sampler refuses a mismatch)."""
    unused = unused_guidance_keys(guidance, model)
    return {k: (GUIDANCE_DEFAULTS[k] if k in unused else v) for k, v in guidance.items()}


def run_name(model: str, smoke: bool, guidance: dict, seed: int, num: int, batch: int,
             labels: str = "balanced") -> str:
    """Readable and unique: everything that changes the images is in the digest."""
    images_depend_on = {k: v for k, v in guidance.items()
                        if k not in unused_guidance_keys(guidance, model) and SAMPLING_OFF.get(k, object()) != v}
    key = json.dumps({"model": model, "smoke": smoke, "guidance": images_depend_on, "seed": seed,
                      "num_samples": num, "per_proc_batch_size": batch,
                      **({"labels": labels} if labels != "balanced" else {})}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{'smoke_' if smoke else ''}{model}_{method_kind(guidance, model)}_seed{seed}_n{num}_{digest}"


@dataclass
class Inputs:
    """Every file a setting reads. `made` maps the SMOKE stand-ins to the function that writes
    each one when it is missing; they are not checked (the run makes them, after the check)."""
    ckpts: dict                     # {sampler option: absolute path}, the registry's checkpoints
    ref: Path
    inception: Optional[Path]       # None: found nowhere (a problem the check reports)
    made: dict = field(default_factory=dict)

    def make_missing(self) -> None:
        for path, make in self.made.items():
            if not path.is_file():
                make(path)


def resolve_inputs(config, args: argparse.Namespace) -> Inputs:
    """The paths of every input of the run; creates nothing."""
    smoke_dir = args.results / "smoke"
    made = {}
    ckpts = checkpoints(config, args, made)
    ref = input_path(args.ref, args.smoke and (smoke_dir / "reference.npz", smoke_reference), made,
                     lambda: Path(args.weights).resolve() / "VIRTUAL_imagenet256_labeled.npz")
    inception = input_path(args.inception_weights,
                           args.smoke and (smoke_dir / "inception_random.safetensors", smoke_inception), made,
                           lambda: search_inception(Path(args.weights)))
    return Inputs(ckpts, ref, inception, made)


def input_path(given: Optional[str], smoke, made: dict, default: Callable[[], Optional[Path]]) -> Optional[Path]:
    """The path the user gave; else SMOKE's stand-in (path, maker), noted in `made`; else `default()`."""
    if given:
        return Path(given).resolve()
    if smoke:
        path, maker = smoke
        made[path] = maker
        return path
    return default()


def checkpoints(config, args: argparse.Namespace, made: dict) -> dict:
    """{sampler option: absolute path} of the generator and its tokenizer (the registry's checkpoints)."""
    family = registry.get(args.model)
    if args.smoke:  # paths of the tiny config, relative to the repository root; missing ones are made
        paths = {}
        for item in family.checkpoints:
            value = OmegaConf.select(config, item.key)
            if value:
                paths[item.key] = (REPO / value).resolve()
            else:
                paths[item.key] = args.results / "smoke" / f"{family.name}_{item.manifest_name}_random.safetensors"
                made[paths[item.key]] = smoke_weights_maker(family, item, config)
        return paths
    real = OmegaConf.load(config_path(args.model, smoke=False))  # its file names: weights/<name>
    return {c.key: Path(args.weights).resolve() / Path(OmegaConf.select(real, c.key)).name
            for c in family.checkpoints}


def smoke_weights_maker(family, item, config) -> Callable[[Path], None]:
    """Writes seeded random weights for a checkpoint the tiny config does not ship (LlamaGen's VQ)."""
    if item.key not in family.smoke_weights:
        raise SettingError(f"{family.smoke_config} sets no {item.key} and the registry entry of "
                           f"{family.name} names no smoke_weights maker for it")

    def make(path: Path) -> None:
        module, _, name = family.smoke_weights[item.key].partition(":")
        state = getattr(importlib.import_module(module), name)(config)
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return make


def search_inception(weights: Path) -> Optional[Path]:
    """The FID Inception file when INCEPTION is unset: $SOFTCFG_INCEPTION_WEIGHTS (the evaluator's
    own setting, so it wins), else a published file name in WEIGHTS, else the evaluator's search."""
    from evaluations.inception import WEIGHT_FILES, WEIGHTS_ENV, find_weights  # imports torch: only here
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser().resolve()  # checked like INCEPTION
    for name in WEIGHT_FILES:
        if (weights / name).is_file():
            return (weights / name).resolve()
    try:
        return find_weights(None).resolve()
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- the check
EVAL_IMAGE_SIZE = 256  # the evaluator's --image-size default, which run_setting never changes
MIN_REF_IMAGES = 4     # the evaluator's k=3 precision/recall needs k + 1 images


def is_html(path: Path) -> bool:
    """softcfg_patch.checkpoint.looks_like_html, imported (with torch: 2 s, before every setting)
    only for a file whose first byte is '<': no other file can be a web page."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return False
    if not head.startswith(b"<"):
        return False
    from softcfg_patch.checkpoint import looks_like_html
    return looks_like_html(path)


def file_problem(path: Path, what: str, source: str) -> Optional[str]:
    """A checkpoint or weight file: it exists and is not a saved web page (not loaded here)."""
    if not path.is_file():
        return f"{what} '{path}': missing; download it from {source}"
    if is_html(path):
        from softcfg_patch.checkpoint import html_message
        return html_message(path, what, source)
    return None


def reference_problem(ref: Path) -> Optional[str]:
    """The reference batch: its zip directory and arr_0 header only (the file can be GBs; the
    evaluator CRC-checks it as it hashes it)."""
    if not ref.is_file():
        return f"reference batch '{ref}': missing; download {REFERENCE_SOURCE}"
    if is_html(ref):
        return (f"reference batch '{ref}': an HTML page, not an npz (a download link that led to a web page); "
                f"download the file itself: {REFERENCE_SOURCE}")
    from evaluations.npz import NpzImages
    try:  # image_size=None: the size is checked below, with advice that fits run_setting
        with NpzImages(ref, image_size=None, role="reference") as images:
            shape = images.shape
    except (SoftCFGError, OSError, ValueError, zipfile.BadZipFile) as err:  # not an npz, no arr_0, not uint8 RGB
        return f"{err}; get a good copy: {REFERENCE_SOURCE}"
    if tuple(shape[1:3]) != (EVAL_IMAGE_SIZE, EVAL_IMAGE_SIZE):
        return (f"reference batch '{ref}': images are {shape[1]}x{shape[2]}, the samples are evaluated at "
                f"{EVAL_IMAGE_SIZE}x{EVAL_IMAGE_SIZE}; use {REFERENCE_SOURCE}")
    if shape[0] < MIN_REF_IMAGES:
        return (f"reference batch '{ref}': holds {shape[0]} images, the evaluator needs at least {MIN_REF_IMAGES}; "
                f"use {REFERENCE_SOURCE}")
    return None


def inception_problem(path: Optional[Path], args: argparse.Namespace) -> Optional[str]:
    from evaluations.inception import WEIGHT_FILES, WEIGHTS_ENV
    downloads = " or ".join(f"{name} from {url}" for name, url in WEIGHT_FILES.items())
    if path is None:
        where = Path(args.weights).resolve() / next(iter(WEIGHT_FILES))
        return (f"FID Inception weights '{where}': missing (not in WEIGHTS, nor in the evaluator's places: "
                f"./weights/, the repository's weights/, torch.hub's checkpoints/); download {downloads} "
                f"into WEIGHTS, or set INCEPTION=path/to/the/file")
    if path.is_file():
        return file_problem(path, "FID Inception weights", downloads)  # a web page?
    setting = "INCEPTION (--inception-weights)" if args.inception_weights else WEIGHTS_ENV
    return (f"FID Inception weights '{path}' (from {setting}): missing; download {downloads} and point "
            f"{setting} at it, or unset it to search WEIGHTS and the evaluator's places")


def input_problems(inputs: Inputs, args: argparse.Namespace) -> list:
    """Everything wrong with the run's inputs, one line each, all of them (not the first only)."""
    problems = []
    for item in registry.get(args.model).checkpoints:
        path = inputs.ckpts[item.key]
        if path not in inputs.made:
            problems.append(file_problem(path, item.what, item.source))
    if inputs.ref not in inputs.made:
        problems.append(reference_problem(inputs.ref))
    if inputs.inception not in inputs.made:
        problems.append(inception_problem(inputs.inception, args))
    if not Path(args.evaluator).is_file():
        problems.append(f"evaluator '{args.evaluator}': missing; set EVALUATOR=path/to/evaluator.py "
                        f"(default {REPO / 'evaluations' / 'evaluator.py'})")
    if args.wandb and importlib.util.find_spec("wandb") is None:  # find_spec: importing wandb takes seconds
        problems.append("WANDB=1 but wandb is not installed: pip install wandb (or unset WANDB)")
    return [p for p in problems if p]


def check_inputs(inputs: Inputs, args: argparse.Namespace) -> None:
    """Fail before hours of sampling if anything the run needs is missing or broken."""
    problems = input_problems(inputs, args)
    if problems:
        fix = ("fix them" if args.smoke else  # SMOKE reads no WEIGHTS
               f"put the files in WEIGHTS={Path(args.weights).resolve()} (or point WEIGHTS, REF or INCEPTION at them)")
        raise SettingError(
            f"{len(problems)} problem(s) with the inputs of {args.model}; nothing was sampled and nothing is "
            f"downloaded automatically:\n" + "\n".join(f"  - {p}" for p in problems) +
            f"\n{fix}, then rerun the same command")


# ----------------------------------------------------------------------------- smoke inputs
def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def smoke_reference(path: Path) -> Path:
    """Random uint8 images from a fixed seed: an ImageNet stand-in no one can mistake for one."""
    if not path.is_file():
        images = np.random.default_rng(0).integers(0, 256, (SMOKE_REF_IMAGES, 256, 256, 3), dtype=np.uint8)
        save_npz(path, images)
    return path


def smoke_inception(path: Path) -> Path:
    """A seeded random FID Inception network (evaluations.inception.random_weights): the
    metrics are finite but meaningless."""
    if not path.is_file():
        from safetensors.torch import save_file

        from evaluations.inception import random_weights
        state = random_weights(SMOKE_INCEPTION_SEED)
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return path


# ----------------------------------------------------------------------------- steps
def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def files_sha256(paths: list) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()


def npz_count(path: Path) -> int:
    """Number of images in an ADM npz, from the arr_0 header only (0 if absent or unreadable)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        return int(shape[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0


def run_command(cmd: list, what: str, extra_env: dict, in_process: bool = False) -> float:
    print("+ " + " ".join(map(str, cmd)), flush=True)
    start = time.time()
    if in_process:
        code = run_script_here(cmd, extra_env)
    else:
        code = subprocess.run(list(map(str, cmd)), cwd=REPO, env={**os.environ, **extra_env}).returncode
    if code != 0:
        raise SettingError(f"{what} failed with exit status {code} (its message is above); fix it "
                           f"and rerun the same command: finished work is kept")
    return time.time() - start


def run_script_here(cmd: list, extra_env: dict) -> int:
    """Run `python script args...` inside this process and return its exit status.

    SMOKE on one process only: the tiny models sample and score in about a second, while a
    fresh interpreter importing torch costs several, twice per setting. Real runs always
    start a process, so a sampler's memory and global state end with it.
    """
    import runpy

    import torch

    script, *script_args = map(str, cmd[1:])
    saved_argv, saved_env, saved_threads = sys.argv, dict(os.environ), torch.get_num_threads()
    sys.argv = [script, *script_args]
    os.environ.update(extra_env)
    if "OMP_NUM_THREADS" in extra_env:  # read by torch only at import, so set it directly
        torch.set_num_threads(int(extra_env["OMP_NUM_THREADS"]))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)  # sys.exit("message"): printed, status 1
        return 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)


def sample(args, config_file: Path, ckpts: dict, guidance: dict, batch: int, out: Path, run: str,
           child_env: dict, ref: Optional[Path] = None, inception: Optional[Path] = None) -> dict:
    """Sample into out/ (and out.npz but with SAMPLES=none) unless a complete npz exists; with
    `ref`, the sampler evaluates while sampling (out.metrics.json). Returns timing info."""
    npz, meta_path = Path(f"{out}.npz"), Path(f"{out}.sampling.json")
    if ref is None and npz_count(npz) == args.num_samples and meta_path.is_file():
        print(f"samples: reusing {npz}", flush=True)
        return {**json.loads(meta_path.read_text()), "reused": True}
    script = REPO / registry.get(args.model).script
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd = launcher + [script, "--config", config_file, f"--experiment.output_dir={out}"]
    cmd += [f"--{key}={path}" for key, path in ckpts.items()]
    cmd += [f"--model.generator.{k}={v}" for k, v in sampler_guidance(guidance, args.model).items()]
    cmd += [f"--sample.num_fid_samples={args.num_samples}", f"--sample.seed={args.seed}",
            f"--sample.per_proc_batch_size={batch}"]
    if args.device != "auto":
        cmd += [f"--sample.device={args.device}"]
    if args.labels != "balanced":
        cmd += [f"--sample.labels={args.labels}"]
    if args.wandb:
        cmd += ["--wandb.enabled=True", f"--wandb.name={run}"]
    if ref is not None:
        cmd += [f"--sample.images={args.samples}", f"--sample.fid_reference={ref}",
                f"--sample.inception_weights={inception}", f"--sample.bootstrap={args.bootstrap}"]
        if args.smoke:  # as the evaluator's SMOKE runs: the same trace as sqrtm to ~1e-9, faster on a CPU
            cmd += ["--sample.fid_method=eigh"]
    wall = run_command(cmd, "sampling", child_env, in_process=args.in_process)
    meta = {"wall_s": round(wall, 2), "command": " ".join(map(str, cmd))}
    write_json(meta_path, meta)
    return {**meta, "reused": False}


def eval_cache_path(out: Path, ref: Path, inception: Path, evaluator: str, bootstrap: int) -> Path:
    """Where the evaluation of out.npz against this reference and Inception network is kept."""
    key = f"{ref}|{ref.stat().st_size}|{inception}|{evaluator}|bootstrap{bootstrap}"
    key = hashlib.sha256(key.encode()).hexdigest()
    return Path(f"{out}.eval-{key[:10]}.json")


def evaluate(args, npz: Path, ref: Path, inception: Path, cache: Path, child_env: dict) -> dict:
    """Run the evaluator; its json (metrics + settings) plus timing is kept in `cache`."""
    out_json = cache.with_name(f".{cache.name}.evaluator.{os.getpid()}.json")
    # the Inception file the check found, passed explicitly: the evaluator uses (and the row
    # records) that file, not whatever its own search would find at evaluation time
    cmd = [sys.executable, args.evaluator, ref, npz, "--json", out_json, "--bootstrap", args.bootstrap,
           "--inception-weights", inception]
    if args.device != "auto":
        cmd += ["--device", args.device]
    if args.smoke:  # same trace as sqrtm to ~1e-9 (evaluator --help), 6x faster on a CPU
        cmd += ["--fid-method", "eigh"]
    try:
        wall = run_command(cmd, "evaluation", child_env, in_process=args.in_process)
        result = json.loads(out_json.read_text())
    finally:
        if out_json.exists():
            out_json.unlink()
    record = {"evaluator_json": result, "wall_s": round(wall, 2), "command": " ".join(map(str, cmd))}
    write_json(cache, record)
    return {**record, "reused": False}


def evaluated_while_sampling(out: Path, sampling: dict, cache: Path) -> dict:
    """The sampler's out.metrics.json (the evaluator's --json format) as an evaluation record."""
    path = Path(f"{out}.metrics.json")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SettingError(f"the sampler wrote no readable {path} ({err}); rerun the same command") from None
    seconds = result.get("settings", {}).get("wall_time_s", {})  # inside the sampling time
    record = {"evaluator_json": result, "wall_s": round(sum(seconds.values()), 2), "evaluated_while_sampling": True,
              "command": sampling["command"]}
    write_json(cache, record)
    return {**record, "reused": False}


METRICS = ("fid", "inception_score", "sfid", "precision", "recall")


def make_row(args, run: str, guidance: dict, batch: int, config_file: Path, ckpts: dict, ref: Path,
             npz: Path, sampling: dict, evaluation: dict, total: float) -> dict:
    ev = evaluation["evaluator_json"]
    missing = [m for m in METRICS if m not in ev]
    if missing:
        raise SettingError(f"the evaluator's json lacks {missing}; is {args.evaluator} the project's evaluator?")
    settings = ev.get("settings", {})
    evaluator_files = sorted(Path(args.evaluator).parent.glob("*.py"))
    row = {
        "schema": 1,
        "run": run, "table": args.table, "order": args.order,
        "model": args.model, "method": args.method, "kind": method_kind(guidance, args.model),
        "smoke": args.smoke, "label": SMOKE_LABEL if args.smoke else "",
        "guidance": guidance, "seed": args.seed, "num_samples": args.num_samples, "labels": args.labels,
        "per_proc_batch_size": batch, "nproc": args.nproc,
        "metrics": {m: float(ev[m]) for m in METRICS},
        "bootstrap": ev.get("bootstrap"),  # per metric {value, std, ci_low, ci_high}
        "git_commit": git_commit(),
        "evaluator": {"script": os.path.relpath(args.evaluator, REPO),
                      "code_sha256": files_sha256(evaluator_files),
                      "settings": settings, "command": evaluation["command"]},
        "inception_weights": {
            "path": settings.get("inception_weights"), "sha256": settings.get("inception_sha256"),
            "kind": ("random (seeded recipe, NOT the FID Inception network)" if args.smoke
                     else "FID Inception (2015-12-05 TF graph port)")},
        "reference": {"path": str(ref), "sha256": settings.get("ref_sha256")},
        "config": os.path.relpath(config_file, REPO),
        "checkpoints": {k: str(v) for k, v in ckpts.items()},
        "samples": str(npz), "samples_kept": args.samples,
        "wall_time_s": {"sampling": sampling["wall_s"], "evaluation": evaluation["wall_s"],
                        "this_invocation": round(total, 2)},
        "reused": {"sampling": sampling["reused"], "evaluation": evaluation["reused"]},
        "sample_command": sampling["command"],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }
    return row


def log_wandb(row: dict) -> None:
    """Best effort: the row is already on disk, so a W&B problem only costs the upload."""
    import wandb
    try:
        _log_wandb(wandb, row)
    except Exception as err:  # noqa: BLE001 - login, network, quota ...
        print(f"warning: W&B logging failed ({type(err).__name__}: {err}); the row is saved", file=sys.stderr)


def _log_wandb(wandb, row: dict) -> None:
    run = wandb.init(project=env("WANDB_PROJECT", "softcfg"), name=row["run"], job_type="evaluation",
                     tags=[row["table"], row["model"], row["kind"]] + (["SMOKE"] if row["smoke"] else []),
                     config={k: v for k, v in row.items() if k != "metrics"})
    run.log(row["metrics"])
    run.summary.update(row["metrics"])
    run.finish()


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    start = time.time()
    config_file = config_path(args.model, args.smoke)
    config = OmegaConf.load(config_file)
    if args.check_only:  # scripts/common.sh, once per model before its first setting: a table
        check_inputs(resolve_inputs(config, args), args)  # stops before its first sample, not hours in
        print(f"inputs of {args.model}{' (SMOKE)' if args.smoke else ''}: ok", flush=True)
        return 0
    # SMOKE swaps the networks, not the settings: guidance comes from the real model's config.
    guidance = effective_guidance(OmegaConf.load(config_path(args.model, smoke=False)), args)
    batch = int(args.batch or (4 if args.smoke else config.sample.per_proc_batch_size))
    run = run_name(args.model, args.smoke, guidance, args.seed, args.num_samples, batch, args.labels)
    row_path = args.results / args.table / "rows" / f"{run}.json"
    tag = f"[{args.table}] {args.model} {args.method} seed {args.seed}" + (" (SMOKE)" if args.smoke else "")
    if row_path.is_file():
        print(f"skip {tag}: row exists {row_path}", flush=True)
        return 0
    print(f"=== {tag}: {run}", flush=True)

    inputs = resolve_inputs(config, args)
    check_inputs(inputs, args)  # again: run_setting.py is also run by hand, and files move in hours
    inputs.make_missing()  # SMOKE's stand-ins, only once the check passed: a failure leaves RESULTS alone
    ckpts, ref, inception = inputs.ckpts, inputs.ref, inputs.inception
    # Tiny models gain nothing from threads, and on a busy CI machine oversubscribed
    # threads made the tiny sampler 10x slower.
    child_env = {"OMP_NUM_THREADS": env("OMP_NUM_THREADS", "1")} if args.smoke else {}

    out = args.results / "samples" / run
    npz, sampling_meta = Path(f"{out}.npz"), Path(f"{out}.sampling.json")
    cache = eval_cache_path(out, ref, inception, args.evaluator, args.bootstrap)
    samples = npz if args.samples == "png" else out  # what compare.py reads for the paired deltas
    if cache.is_file() and sampling_meta.is_file() and samples.exists():  # another table evaluated this setting
        print(f"reusing the samples and evaluation of {run} ({cache})", flush=True)
        sampling = {**json.loads(sampling_meta.read_text()), "reused": True}
        evaluation = {**json.loads(cache.read_text()), "reused": True}
    elif args.samples == "png":
        sampling = sample(args, config_file, ckpts, guidance, batch, out, run, child_env)
        if npz_count(npz) != args.num_samples:
            raise SettingError(f"{npz} does not hold {args.num_samples} images after sampling; rerun to resume")
        evaluation = evaluate(args, npz, ref, inception, cache, child_env)
    else:  # the sampler scores its own activations
        sampling = sample(args, config_file, ckpts, guidance, batch, out, run, child_env, ref, inception)
        evaluation = evaluated_while_sampling(out, sampling, cache)
    row = make_row(args, run, guidance, batch, config_file, ckpts, ref, samples, sampling, evaluation,
                   time.time() - start)
    write_json(row_path, row)  # last: a row exists only for finished work
    m = row["metrics"]
    print(f"row {row_path}: FID {m['fid']:.4f} IS {m['inception_score']:.2f} sFID {m['sfid']:.4f} "
          f"precision {m['precision']:.4f} recall {m['recall']:.4f}" + (f"  [{SMOKE_LABEL}]" if args.smoke else ""),
          flush=True)
    if args.wandb:
        log_wandb(row)
    if args.delete_samples and args.samples == "png":
        shutil.rmtree(out, ignore_errors=True)
        npz.unlink(missing_ok=True)
    elif args.delete_samples:  # the shards keep tokens and activations for paired deltas
        npz.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SoftCFGError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
