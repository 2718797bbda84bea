"""Digits: data, the small AliTok generator, its training, and the evaluation classifier.

The UCI handwritten digits ship inside scikit-learn (1,797 images, 8x8, gray levels
0..16, 10 classes), so nothing is downloaded. Each gray level is one token: an image
is 64 tokens in raster order and the generator is the project's own `alitok.ARModel`.

Training command that produced the shipped weights (demo/weights/):

    python -m demo.digits --out demo/weights

It trains the generator and the classifier from fixed seeds and records a reference
check (demo/weights/digits_ar.json) that tests/test_demo.py re-runs.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file
from tqdm import tqdm

import softcfg_patch as sp
from alitok.model import ARModel
from softcfg_patch.checkpoint import load_model
from softcfg_patch.errors import ConfigError, exit_on_error
from softcfg_patch.run.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = CONFIG_DIR / "digits.yaml"  # configs/digits.yaml, also in a wheel
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GENERATOR_FILE = "digits_ar.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
REFERENCE_FILE = "digits_ar.json"
# quoted by the loader's errors: where good weight files come from
WEIGHTS_SOURCE = "the repository's demo/weights/ (or retrain them: python -m demo.digits --out FOLDER)"
CONFIG_EXAMPLE = "configs/digits.yaml (the default)"  # quoted by the config errors
NUM_LEVELS = 17  # gray levels 0..16 = the token vocabulary
NUM_CLASSES = 10

# The reference check: a small, fixed sampling run whose numbers are recorded at
# training time and re-run by the tests.
REFERENCE_SAMPLES_PER_CLASS = 10
REFERENCE_SEED = 1234
REFERENCE_SCALE = 3.0
REFERENCE_POW = 1.0


def load_config(path: str | Path = CONFIG_PATH) -> DictConfig:
    """A digits demo config. A missing file, one that is not plain YAML, or a config of another
    kind (a sampler's) is a one-line ConfigError; YAML tags that build Python objects are never run."""
    found = _find_config(Path(path))
    try:
        cfg = OmegaConf.load(found)  # a safe YAML loader: a python tag is an error, not executed
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_message(found, err)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {found} is not a text (UTF-8 YAML) file; pass a file like "
                          f"{CONFIG_EXAMPLE}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config {found} cannot be read as a config ({str(err).splitlines()[0]}); pass a file "
                          f"like {CONFIG_EXAMPLE}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {found} holds a {type(cfg).__name__.replace('Config', '').lower()}, not a digits "
                          f"demo config; pass a file like {CONFIG_EXAMPLE}")
    _check_kind(cfg, found)
    return cfg


def _find_config(path: Path) -> Path:
    """A relative path is tried from the current folder, then from the repository root (as the samplers do)."""
    candidates = [path] if path.is_absolute() else list(dict.fromkeys([Path.cwd() / path, ROOT / path]))
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"config file not found: {path} (looked in {', '.join(map(str, candidates))}); pass a "
                          f"digits demo config such as {CONFIG_EXAMPLE}")
    return found


def _yaml_message(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"config {path}" + (f" line {mark.line + 1}" if mark is not None else "")
    tag = re.search(r"constructor for the tag '([^']+)'", str(err))
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (f"{where}: the YAML tag '{name}' is not allowed (configs are plain YAML; tags that build "
                f"Python objects could run code and are never executed); write the plain value instead, as in "
                f"{CONFIG_EXAMPLE}")
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: the file is not valid YAML ({problem}); fix it, or start from {CONFIG_EXAMPLE}"


def _check_kind(cfg: DictConfig, path: Path) -> None:
    """Every key of the shipped configs/digits.yaml must be set: a sampler's config (RAR, AliTok,
    LlamaGen) is named as such instead of failing later on a missing key."""
    required, present = _leaf_keys(OmegaConf.load(CONFIG_PATH)), set(_leaf_keys(cfg))
    missing = [k for k in required if k not in present]
    if not missing:
        return
    absent = [section for section in dict.fromkeys(k.split(".")[0] for k in required) if section not in cfg]
    if absent:
        names = ", ".join(absent[:-1]) + " or " + absent[-1] if len(absent) > 1 else absent[0]
        raise ConfigError(f"config {path} is not a digits demo config (it has no {names} section)"
                          f"{_other_kind(cfg, path)}; pass a digits demo config such as {CONFIG_EXAMPLE}")
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ConfigError(f"config {path} lacks {shown}: a digits demo config sets every key of {CONFIG_EXAMPLE}; "
                      f"add them (copy configs/digits.yaml and edit it)")


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """"a.b.c" for every leaf, in file order; values are not resolved (an interpolation is checked
    where it is used)."""
    keys = []
    for key, value in cfg.items_ex(resolve=False):
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, DictConfig) else [f"{prefix}{key}"]
    return keys


def _other_kind(cfg: DictConfig, path: Path) -> str:
    """"; it is a RAR sampler config: use rar/sample_imagenet.py" when the file or its
    experiment.name names a model family, else ""."""
    from softcfg_patch.run import registry
    for name in (path.stem, str(OmegaConf.select(cfg, "experiment.name", default="",
                                                      throw_on_resolution_failure=False))):
        try:
            family = registry.get(name)
        except KeyError:
            continue
        article = "an" if family.title[0] in "AEIOU" else "a"
        return f"; it is {article} {family.title} sampler config: use {family.script}"
    return ""


# -- data ------------------------------------------------------------------------------

@dataclass
class DigitsSplit:
    """Tokens are LongTensor [n, 64] of gray levels 0..16; labels LongTensor [n]."""

    train_tokens: torch.Tensor
    train_labels: torch.Tensor
    test_tokens: torch.Tensor
    test_labels: torch.Tensor


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """A stratified train / held-out split of sklearn's bundled digits (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    tokens = np.rint(data.data).astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(tokens, data.target.astype(np.int64),
                                              test_size=test_fraction, random_state=seed,
                                              stratify=data.target)
    return DigitsSplit(*(torch.from_numpy(a) for a in (tr_x, tr_y, te_x, te_y)))


def load_split(cfg: DictConfig) -> DigitsSplit:
    return load_digits_split(cfg.data.test_fraction, cfg.data.split_seed)


def to_pixels(tokens: torch.Tensor) -> torch.Tensor:
    """Gray-level tokens [n, 64] -> float pixels in [0, 1]."""
    return tokens.float() / (NUM_LEVELS - 1)


# -- generator -------------------------------------------------------------------------

def build_generator(cfg: DictConfig) -> ARModel:
    return ARModel(cfg)


def drop_labels(model: ARModel, labels: torch.Tensor, p: float,
                generator: torch.Generator) -> torch.Tensor:
    """Condition ids with a fraction p replaced by "none": the unconditional branch CFG needs."""
    ids = model.condition_ids(labels)
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, model.none_condition_ids(labels), ids)


def token_loss(model: ARModel, tokens: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats); row r of the logits predicts token r."""
    logits = model(tokens, condition_ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batch_indices(n: int, batch_size: int, epochs: int,
                  rng: torch.Generator) -> Iterator[torch.Tensor]:
    """A fresh permutation per epoch, cut into batches (the last one may be shorter)."""
    for _ in range(epochs):
        yield from torch.randperm(n, generator=rng).split(batch_size)


def train_generator(cfg: DictConfig, split: DigitsSplit, progress: bool = True) -> ARModel:
    """Train the class-conditional AR model on the training split from a fixed seed."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_generator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                            betas=(0.9, 0.95))
    rng = torch.Generator().manual_seed(tc.seed)  # shuffling and label dropout
    n = split.train_tokens.shape[0]
    total = tc.epochs * math.ceil(n / tc.batch_size)
    bar = tqdm(total=total, desc="train generator", disable=not progress)
    model.train()
    for step, idx in enumerate(batch_indices(n, tc.batch_size, tc.epochs, rng)):
        cond = drop_labels(model, split.train_labels[idx], cfg.model.generator.class_label_dropout, rng)
        loss = token_loss(model, split.train_tokens[idx], cond)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, tc.lr, tc.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def heldout_bits_per_pixel(model: ARModel, tokens: torch.Tensor, labels: torch.Tensor,
                           conditional: bool = True) -> float:
    """Held-out negative log-likelihood in bits per pixel (conditional or "none" condition)."""
    model.eval()
    ids = model.condition_ids(labels) if conditional else model.none_condition_ids(labels)
    return token_loss(model, tokens, ids).item() / math.log(2)


def load_generator(cfg: DictConfig, weights_dir: str | Path = WEIGHTS_DIR) -> ARModel:
    return load_model(lambda: build_generator(cfg), Path(weights_dir) / GENERATOR_FILE,
                      what="digits generator", source=WEIGHTS_SOURCE)


# -- classifier (the evaluator's feature network) --------------------------------------

class DigitClassifier(nn.Module):
    """A small MLP on pixels; the penultimate layer is the feature embedding of the metrics."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, NUM_CLASSES)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def train_classifier(cfg: DictConfig, split: DigitsSplit) -> DigitClassifier:
    """Full-batch Adam on the training split, fixed seed: a few seconds, deterministic."""
    cc = cfg.classifier
    torch.manual_seed(cc.seed)
    clf = DigitClassifier(cc.hidden, cc.features)
    opt = torch.optim.AdamW(clf.parameters(), lr=cc.lr, weight_decay=cc.weight_decay)
    x, y = to_pixels(split.train_tokens), split.train_labels
    for _ in range(cc.steps):
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


def load_classifier(cfg: DictConfig, weights_dir: str | Path = WEIGHTS_DIR) -> DigitClassifier:
    return load_model(lambda: DigitClassifier(cfg.classifier.hidden, cfg.classifier.features),
                      Path(weights_dir) / CLASSIFIER_FILE, what="digits classifier", source=WEIGHTS_SOURCE,
                      architecture=f"hidden {cfg.classifier.hidden}, features {cfg.classifier.features}")


@torch.no_grad()
def predict(clf: DigitClassifier, tokens: torch.Tensor) -> torch.Tensor:
    return clf(to_pixels(tokens)).argmax(-1)


@torch.no_grad()
def embed(clf: DigitClassifier, tokens: torch.Tensor) -> np.ndarray:
    """Classifier features (float64 numpy, [n, features]) of gray-level tokens."""
    return clf.features(to_pixels(tokens)).double().numpy()


# -- sampling and the reference check ----------------------------------------------------

def class_labels(samples_per_class: int) -> torch.Tensor:
    """[0]*n + [1]*n + ... : class-major, so grids and per-class metrics slice easily."""
    return torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)


def sample(model: ARModel, labels: torch.Tensor, guidance: sp.Guidance, seed: int,
           batch_size: int = 500) -> torch.Tensor:
    """Tokens [n, 64] through softcfg_patch.generate, the ImageNet code path."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [sp.generate(model, labels[i:i + batch_size], guidance, generator=gen)
              for i in range(0, labels.shape[0], batch_size)]
    return torch.cat(chunks)


def reference_guidances() -> dict[str, sp.Guidance]:
    """The settings of the recorded check: CFG and SoftCFG (alpha 1, step norm) at one scale.

    Fixed here rather than read from the demo config, so editing the demo settings
    never invalidates the recorded numbers.
    """
    common = dict(guidance_scale=REFERENCE_SCALE, guidance_scale_pow=REFERENCE_POW)
    return {"cfg": sp.Guidance(**common),
            "softcfg": sp.Guidance(**common, softcfg_strength=1.0, step_norm=True)}


def reference_check(model: ARModel, clf: DigitClassifier, split: DigitsSplit) -> dict:
    """Numbers a fresh load of the weights must reproduce (tests/test_demo.py)."""
    labels = class_labels(REFERENCE_SAMPLES_PER_CLASS)
    out = {"samples_per_class": REFERENCE_SAMPLES_PER_CLASS, "seed": REFERENCE_SEED,
           "guidance": {k: g.to_dict() for k, g in reference_guidances().items()},
           "classifier_test_accuracy": accuracy(predict(clf, split.test_tokens), split.test_labels),
           "heldout_bits_per_pixel": heldout_bits_per_pixel(model, split.test_tokens, split.test_labels),
           "heldout_bits_per_pixel_uncond": heldout_bits_per_pixel(
               model, split.test_tokens, split.test_labels, conditional=False)}
    for name, guidance in reference_guidances().items():
        tokens = sample(model, labels, guidance, REFERENCE_SEED)
        out[f"{name}_sample_accuracy"] = accuracy(predict(clf, tokens), labels)
    return out


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).double().mean().item()


# -- the training command ----------------------------------------------------------------

def train_all(cfg: DictConfig, out: str | Path, progress: bool = True) -> dict:
    """Train generator + classifier, save them to `out`, and write the reference json."""
    torch.set_num_threads(cfg.train.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(cfg)
    start = time.time()
    clf = train_classifier(cfg, split)
    model = train_generator(cfg, split, progress)
    seconds = time.time() - start
    save_file(model.state_dict(), str(out / GENERATOR_FILE))
    save_file(clf.state_dict(), str(out / CLASSIFIER_FILE))
    record = {"train_command": f"python -m demo.digits --out {out}",
              "train_seconds": round(seconds, 1), "torch": torch.__version__,
              "config": OmegaConf.to_container(cfg.model), "train": OmegaConf.to_container(cfg.train),
              **reference_check(model, clf, split)}
    (out / REFERENCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


@exit_on_error()  # a bad --config: `error: ...`, exit status 2
def main() -> None:
    parser = argparse.ArgumentParser(description="Train the digits generator and classifier.")
    parser.add_argument("--config", default=str(CONFIG_PATH))
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="where the weights and json go")
    args = parser.parse_args()
    record = train_all(load_config(args.config), args.out)
    print(json.dumps({k: v for k, v in record.items() if k not in ("config", "train")}, indent=2))


if __name__ == "__main__":
    main()
