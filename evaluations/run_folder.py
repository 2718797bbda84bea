"""A sampler's output folder read as a sample batch, so that the evaluator and compare.py take
`outputs/<run>` wherever they take `outputs/<run>.npz`.

The folder's shards (softcfg_patch/shards.py) give the labels, and the Inception activations
when the run evaluated while sampling (`sample.fid_reference`): then no image is read at all.
Activations of another network (or none) fall back to the run's `<output_dir>.npz`; a run
that kept no images and no matching activations is refused with what to do.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from evaluations.npz import BatchFileError
from softcfg_patch.shards import ACTIVATIONS, Layout, shard_arrays, shard_complete, shard_path

MANIFEST = "manifest.json"  # softcfg_patch/run/manifest.py's FILENAME (the evaluator never imports the runner)


def is_run_folder(path) -> bool:
    return Path(path).is_dir()


class RunFolder:
    """The samples of one finished run: `len`, `shape`, `labels`, its manifest and, when stored,
    the activations of the network that `inception` names."""

    def __init__(self, path, image_size: int | None = 256, role: str = "sample"):
        self.path, self.role = Path(path), role
        where = f"{role} run folder '{self.path}'"
        try:
            self.manifest_text = (self.path / MANIFEST).read_text()
            self.manifest = json.loads(self.manifest_text)
            images = self.manifest["images"]
            self.num_samples = int(images["sample.num_fid_samples"])
            self.batch_size = int(images["sample.per_proc_batch_size"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BatchFileError(f"{where} is not a finished sampler run (no readable {MANIFEST}: {err}); pass "
                                 f"the run's output_dir or an npz") from None
        self.num_batches = -(-self.num_samples // self.batch_size)
        rows = [range(k * self.batch_size, min((k + 1) * self.batch_size, self.num_samples))
                for k in range(self.num_batches)]
        missing = [k for k, r in enumerate(rows) if not shard_complete(shard_path(self.path, k), r, Layout("none"))]
        if missing:
            raise BatchFileError(f"{where} is unfinished: {len(missing)} of {self.num_batches} shards are missing "
                                 f"or incomplete (batch {missing[0]} first); rerun its sampler command to finish it")
        with np.load(shard_path(self.path, 0)) as first:
            self.inception = str(first["inception"]) if "inception" in first.files else ""
            self._has_images = "images" in first.files
        side = int(self.manifest.get("recorded", {}).get("image_size", 0)) or None
        self.shape = (self.num_samples, side, side, 3)
        if image_size and side and side != image_size:
            raise BatchFileError(f"{where}: images are {side}x{side}, expected {image_size}x{image_size}; pass "
                                 f"--image-size {side} if this is intended")
        self.labels = shard_arrays(self.path, self.num_batches, ("labels",))["labels"]

    def __len__(self) -> int:
        return self.num_samples

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read_stats(self) -> dict:
        return {}

    def read_arrays(self, names) -> dict:
        """`labels` and `manifest` as the sampler's npz extras hold them."""
        extras = {"labels": self.labels, "manifest": np.array(self.manifest_text)}
        return {k: extras[k] for k in names if k in extras}

    def sha256(self) -> str:
        """Names the samples: the manifest plus every shard's bytes (tokens, labels, activations)."""
        digest = hashlib.sha256(self.manifest_text.encode())
        for k in range(self.num_batches):
            digest.update(shard_path(self.path, k).read_bytes())
        return digest.hexdigest()

    def npz(self) -> Path:
        return Path(f"{self.path}.npz")

    def stored_activations(self, key: str, limit: int) -> dict | None:
        """The first `limit` rows of the activations the run stored, if they are of network `key`."""
        if self.inception != key:
            return None
        acts = shard_arrays(self.path, self.num_batches, ACTIVATIONS)
        for k in range(self.num_batches):  # every shard of the same network, not only the first
            with np.load(shard_path(self.path, k)) as shard:
                if str(shard["inception"]) != key:
                    return None
        return {name: value[:limit] for name, value in acts.items()}

    def no_images_error(self, key: str) -> BatchFileError:
        why = ("stored no Inception activations" if not self.inception else
               "stored the activations of another Inception network or pre-processing")
        return BatchFileError(f"{self.role} run folder '{self.path}' {why} and has no {self.npz().name} to read "
                              f"the images from: rebuild it with `python scripts/decode_tokens.py {self.path}` "
                              f"or evaluate with the Inception weights the run used")
