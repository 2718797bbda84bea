"""Shards: one file per sampled batch, the record every run keeps (sampler, evaluator,
scripts/decode_tokens.py). Plain numpy, below both the runner and the evaluator.

`<output_dir>/shards/batch_<k>.npz` holds batch k's sample `indices`, `labels` and `tokens`
(the smallest unsigned dtype that holds the codebook: enough to rebuild every image
exactly), plus the uint8 `images` [B, H, W, 3] with `sample.images=shards`, plus the FID
Inception `pool`, `spatial` and `logits` activations and the network's `inception` key
(0-d string) when the run evaluates while sampling. A `Layout` says which a run keeps. With
`sample.images=png` the images are PNG files beside the shards; with `none` they are not kept.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .files import save_npz

IMAGE_MODES = ("png", "shards", "none")
ACTIVATIONS = ("pool", "spatial", "logits")  # the FID Inception features the metrics need


@dataclass(frozen=True)
class Layout:
    """What a run keeps of every batch: its images as PNGs, in its shard or not at all, and
    the activations of the Inception network `inception` names ("": none kept)."""
    images: str = "png"
    inception: str = ""

    @property
    def pngs(self) -> bool:
        return self.images == "png"

    def members(self) -> tuple:
        """The arrays every complete shard of this layout holds."""
        return (("indices", "labels", "tokens") + ("images",) * (self.images == "shards")
                + (ACTIVATIONS + ("inception",) if self.inception else ()))


def shard_path(out: Path, batch_index: int) -> Path:
    return out / "shards" / f"batch_{batch_index:06d}.npz"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds token ids 0..vocab_size-1."""
    return np.min_scalar_type(max(int(vocab_size) - 1, 0))


def save_shard(path: Path, arrays: dict) -> None:
    """Batch k's record, written whole or not at all (uncompressed: images do not deflate)."""
    save_npz(path, **arrays)


def npz_shapes(path: Path) -> dict:
    """{member: shape} of an npz, read from the .npy headers only (no array is loaded)."""
    shapes = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shapes[name[:-4]] = read(f)[0]
    return shapes


def shard_complete(path: Path, indices: range, layout: Layout) -> bool:
    """The shard of `indices` is on disk, whole, with every array of `layout` for every row,
    and its activations come from the network `layout.inception` names."""
    try:
        shapes = npz_shapes(path)
        if any(name not in shapes for name in layout.members()):
            return False
        if any(shapes[name][:1] != (len(indices),) for name in layout.members() if name != "inception"):
            return False
        with np.load(path) as shard:
            if not np.array_equal(shard["indices"], np.arange(indices.start, indices.stop)):
                return False
            return not layout.inception or str(shard["inception"]) == layout.inception
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):  # missing, truncated, not ours
        return False


def shard_images(out: Path, num_batches: int) -> Iterator[np.ndarray]:
    """The images of every batch in order, one shard in memory at a time."""
    for k in range(num_batches):
        with np.load(shard_path(out, k)) as shard:
            yield shard["images"]


def shard_arrays(out: Path, num_batches: int, names: tuple) -> dict:
    """{name: the arrays `names` of every shard, concatenated in sample order}."""
    parts = {name: [] for name in names}
    for k in range(num_batches):
        with np.load(shard_path(out, k)) as shard:
            for name in names:
                parts[name].append(shard[name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}
