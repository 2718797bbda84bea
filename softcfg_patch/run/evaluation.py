"""Evaluate while sampling (`sample.fid_reference=REF.npz`): every process runs the FID
Inception network on each batch it decodes and stores the activations in the batch's shard;
at the end rank 0 scores them against the reference exactly as `evaluations/evaluator.py`
scores an npz (same network, pre-processing, reference cache and metric code) and writes
`<output_dir>.metrics.json` in the evaluator's `--json` format.

So a 50k run needs no PNG, no image npz and no second pass over the images: the table
scripts default to `sample.images=none` with this.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import html_message, looks_like_html
from ..errors import ConfigError, SoftCFGError
from ..shards import ACTIVATIONS, shard_arrays

FID_METHODS = ("sqrtm", "eigh")
REFERENCE_SOURCE = "the ADM reference batches (openai/guided-diffusion evaluations/README.md), e.g. " \
                   "`softcfg-download reference`"


def image_size(config: DictConfig, family) -> int:
    """The side of the images a run of `family` writes (its registry entry says where to read it)."""
    size = family.image_size
    return int(OmegaConf.select(config, size)) if isinstance(size, str) else int(size)


def check_evaluation(config: DictConfig, family) -> None:
    """Before anything runs: the image mode makes sense, the reference is a readable npz of the
    run's image size and the Inception weights are found. Paths are made absolute in place."""
    s = config.sample
    if s.images == "none" and not s.fid_reference and not s.tokens_only:
        raise ConfigError("sample.images=none keeps no images and computes no metrics: pass "
                          "--sample.fid_reference=REF.npz to evaluate while sampling, --sample.images=shards or "
                          "png to keep the images, or --sample.tokens_only=True for tokens alone (rebuild the "
                          "images later with scripts/decode_tokens.py)")
    if not s.fid_reference:
        for name in ("inception_weights", "bootstrap"):
            if s[name] not in ("", 0):
                raise ConfigError(f"sample.{name} is set but sample.fid_reference is not: pass the reference "
                                  f"batch with --sample.fid_reference=REF.npz to evaluate while sampling")
        return
    if s.tokens_only:
        raise ConfigError("sample.fid_reference needs images to score, but sample.tokens_only=True decodes none: "
                          "drop one of the two")
    if s.bootstrap != 0 and s.bootstrap < 10:
        raise ConfigError(f"sample.bootstrap must be 0 (off) or >= 10 resamples, got {s.bootstrap}")
    if s.fid_method not in FID_METHODS:
        raise ConfigError(f"sample.fid_method must be one of {', '.join(FID_METHODS)}, got {s.fid_method!r}")
    config.sample.fid_reference = check_reference(Path(str(s.fid_reference)).expanduser(), image_size(config, family))
    config.sample.inception_weights = find_inception(str(s.inception_weights))


def check_reference(path: Path, size: int) -> str:
    from evaluations.npz import NpzImages
    if not path.is_file():
        raise ConfigError(f"sample.fid_reference '{path}' not found: download {REFERENCE_SOURCE} and pass its path")
    if looks_like_html(path):
        raise ConfigError(html_message(path, "sample.fid_reference", REFERENCE_SOURCE))
    try:
        with NpzImages(path, image_size=None, role="reference") as ref:
            shape = ref.shape
    except (SoftCFGError, OSError, ValueError) as err:
        raise ConfigError(f"sample.fid_reference: {err}") from None
    if tuple(shape[1:3]) != (size, size):
        raise ConfigError(f"sample.fid_reference '{path}' holds {shape[1]}x{shape[2]} images but this model writes "
                          f"{size}x{size}: pass the reference batch of {size}x{size} ImageNet")
    if shape[0] < 4:
        raise ConfigError(f"sample.fid_reference '{path}' holds {shape[0]} images; precision/recall (k=3) need "
                          f"at least 4 (ADM's reference batches hold 10,000)")
    return str(path.resolve())


def find_inception(given: str) -> str:
    """The Inception weight file: `given`, else the evaluator's lookup ($SOFTCFG_INCEPTION_WEIGHTS,
    ./weights/, torch.hub's checkpoints)."""
    from evaluations.inception import find_weights
    try:
        return str(find_weights(given or None).resolve())
    except FileNotFoundError as err:
        raise ConfigError(f"sample.fid_reference needs the FID Inception weights: {err} "
                          f"(or pass --sample.inception_weights=PATH)") from None


class Evaluation:
    """The Inception network of one process, and (rank 0) the final scoring."""

    def __init__(self, config: DictConfig, device: torch.device, rank: int):
        from evaluations import evaluator as E
        from evaluations.inception import FIDInception
        from evaluations.npz import NpzImages, file_sha256
        s = config.sample
        self.config, self.device = config, device
        self.inception_s = 0.0  # this process's time in the Inception network
        self.weights = Path(str(s.inception_weights))
        self.network = FIDInception(self.weights).to(device)
        self.key = E.network_key(self.network)  # stored in every shard: activations of another network are redone
        self.weights_sha = file_sha256(self.weights) if rank == 0 else ""
        with NpzImages(s.fid_reference, image_size=None, role="reference") as ref:
            self.image_size = tuple(ref.shape[1:3])
        if rank == 0:
            print(f"evaluating while sampling: Inception weights {self.weights} on {device}, reference "
                  f"{s.fid_reference}")
            E.warn_if_unpublished(self.weights, self.weights_sha)

    @torch.inference_mode()
    def activations(self, images) -> dict:
        """pool / spatial / logits (float32 numpy) of a batch of uint8 images [B, H, W, 3]."""
        if tuple(images.shape[1:3]) != self.image_size:
            raise ConfigError(f"the decoder wrote {images.shape[1]}x{images.shape[2]} images but the reference "
                              f"batch {self.config.sample.fid_reference} holds {self.image_size[0]}x"
                              f"{self.image_size[1]}: pass a reference of the model's resolution")
        start = time.perf_counter()
        with torch.autocast(self.device.type, enabled=False):  # fp32, as the evaluator, whatever the sampler runs in
            features = self.network(torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images))
        out = {}
        for name in ACTIVATIONS:
            value = features[name].float()
            if not bool(torch.isfinite(value).all()):
                raise ConfigError(f"the Inception network gave NaN/inf '{name}' features; the weight file "
                                  f"{self.weights} is broken")
            out[name] = value.cpu().numpy()
        self.inception_s += time.perf_counter() - start
        return out

    def finish(self, out: Path, num_batches: int, num_samples: int) -> dict:
        """Rank 0, every shard on disk: the five ADM metrics (and intervals), printed as the evaluator
        prints them and written to <output_dir>.metrics.json; returns the evaluator's json dict."""
        from evaluations import evaluator as E
        from evaluations import metrics
        from evaluations.npz import NpzImages
        s, start = self.config.sample, time.perf_counter()
        args = SimpleNamespace(no_cache=False, batch_size=64, num_workers=2, bootstrap=int(s.bootstrap),
                               bootstrap_seed=0, bootstrap_precision_recall=False)
        sample_acts = shard_arrays(out, num_batches, ACTIVATIONS)
        E.warn_small_n(num_samples)
        with NpzImages(s.fid_reference, image_size=None, role="reference") as ref:
            ref_sha = E.verify_files(ref)[0]
            ref_stats = E._precomputed_stats(ref)
            ref_acts, cache = E.reference_activations(self.network, ref, args, ref_sha)
            num_ref = len(ref)
        reference = {**ref_acts, **ref_stats}
        results = metrics.compute_all(reference, sample_acts, fid_method=s.fid_method, distance="fp16",
                                      device=self.device)
        if args.bootstrap:
            results["bootstrap"] = E.bootstrap_results(reference, sample_acts, results, args, self.device)
        settings = {
            "ref_batch": str(s.fid_reference), "ref_sha256": ref_sha, "num_ref": num_ref,
            "sample_batch": str(out), "num_samples": num_samples,
            "ref_stats": ("precomputed mu/sigma/mu_s/sigma_s from the reference file" if ref_stats
                          else "computed from the reference images (arr_0)"),
            "sample_stats": "computed from the activations stored while sampling",
            "evaluated_while_sampling": True,
            "inception_weights": str(self.weights), "inception_sha256": self.network.identity(),
            "inception_file_sha256": self.weights_sha, "resize": self.network.resize,
            "normalize": self.network.normalize, "dtype": "float32", "device": str(self.device),
            "activation_cache": str(cache["cache"]) if cache["cache"] else None, "cache_hit": cache["cache_hit"],
            "fid_method": s.fid_method, "distance": "fp16", "k": 3, "is_split_size": 5000, "pr_batch_size": 10000,
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
            "wall_time_s": {"inception_while_sampling_rank0": round(self.inception_s, 3),
                            "scoring": round(time.perf_counter() - start, 3)},
        }
        for label, key in E.RESULT_LINES:
            print(f"{label}: {results[key]}")
        if "bootstrap" in results:
            print("\n".join(E.bootstrap_lines(results["bootstrap"])))
        path = metrics_path(out)
        E.write_json(str(path), results, settings)
        print(f"wrote {path}")
        return {**results, "settings": settings}


def metrics_path(out: Path) -> Path:
    return Path(f"{out}.metrics.json")


def load(config: DictConfig, device: torch.device, rank: int) -> Optional[Evaluation]:
    """This process's Evaluation, or None when the run does not evaluate while sampling."""
    if not config.sample.fid_reference:
        return None
    try:
        return Evaluation(config, device, rank)
    except (OSError, ValueError) as err:
        raise ConfigError(f"sample.inception_weights: {err}") from None
