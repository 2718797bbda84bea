"""What a run writes and how it finds what is already there: one shard per batch
(softcfg_patch/shards.py), PNGs, the manifest and the npz archives. Every file is written to
a temporary name and renamed (`atomic_write`), so a file on disk is always complete.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError
from ..files import atomic_write, save_npz
from ..shards import Layout, npz_shapes, shard_arrays, shard_complete, shard_path
from . import manifest as mf


def png_path(out: Path, index: int) -> Path:
    return out / f"{index:06d}.png"


def manifest_path(out: Path) -> Path:
    return out / mf.FILENAME


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


PNG_END = b"IEND\xaeB`\x82"  # the last 8 bytes of every complete PNG


def png_complete(path: Path) -> bool:
    """True when the PNG exists and ends with its IEND chunk (one seek, no decoding)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:  # missing, or shorter than 8 bytes
        return False


def batch_done(out: Path, k: int, indices: range, layout: Layout) -> bool:
    """Every file of batch k is on disk and complete (a truncated file makes the batch run again)."""
    if not shard_complete(shard_path(out, k), indices, layout):
        return False
    return not layout.pngs or all(png_complete(png_path(out, i)) for i in indices)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ConfigError(f"{path} is unreadable ({err}): delete it and rerun the same command "
                          f"(its batch is sampled again)") from err


def npz_is_this_run(npz_path: Path, manifest_text: str, num_samples: int) -> bool:
    """An image npz written by this very run (its manifest, its sample count) is already there."""
    try:
        with zipfile.ZipFile(npz_path) as zf:
            if "manifest.npy" not in zf.namelist():
                return False
            with zf.open("manifest.npy") as f:
                if str(np.lib.format.read_array(f)) != manifest_text:
                    return False
        return npz_shapes(npz_path)["arr_0"][:1] == (num_samples,)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def png_images(out: Path, num_samples: int) -> Iterator[np.ndarray]:
    """Every PNG in order, one image at a time, as a batch of one."""
    for i in range(num_samples):
        yield _read_png(png_path(out, i))[None]


def write_npz_from_pngs(out: Path, num_samples: int, npz_path: Path, labels: Optional[np.ndarray] = None,
                        manifest_text: Optional[str] = None) -> Path:
    """Stream the PNGs into `npz_path` (write_images_npz), one image in memory at a time."""
    return write_images_npz(png_images(out, num_samples), num_samples, npz_path, labels, manifest_text)


def write_images_npz(batches: Iterator[np.ndarray], num_samples: int, npz_path: Path,
                     labels: Optional[np.ndarray] = None, manifest_text: Optional[str] = None) -> Path:
    """Stream uint8 image batches into `npz_path` as arr_0 [N, H, W, 3], one batch in memory.

    `labels` (int64 [N]) and `manifest_text` (0-d unicode array) are stored beside arr_0;
    the ADM evaluator reads arr_0 only. PNGs and shards of one run give the same bytes.
    """
    batches = iter(batches)
    first = next(batches)
    shape = (num_samples, *first.shape[1:])

    def write(tmp: Path) -> None:
        written = 0
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                with tqdm(total=num_samples, desc=f"writing {npz_path.name}", leave=False, unit="image") as bar:
                    for batch in _chain(first, batches):
                        if batch.shape[1:] != first.shape[1:] or batch.dtype != np.uint8:
                            raise RuntimeError(f"image {written} has shape {batch.shape[1:]} ({batch.dtype}), "
                                               f"expected {first.shape[1:]} (uint8)")
                        member.write(np.ascontiguousarray(batch).tobytes())
                        written += len(batch)
                        bar.update(len(batch))
            if written != num_samples:
                raise RuntimeError(f"{written} images streamed into {npz_path}, expected {num_samples}")
            for name, array in (("labels", None if labels is None else np.asarray(labels, dtype=np.int64)),
                                ("manifest", None if manifest_text is None else np.array(manifest_text))):
                if array is not None:
                    with zf.open(f"{name}.npy", "w") as member:
                        np.lib.format.write_array(member, array)
    atomic_write(npz_path, write)
    return npz_path


def _chain(first, rest):
    yield first
    yield from rest


def write_tokens_npz(out: Path, num_batches: int, labels: np.ndarray, npz_path: Path,
                     manifest_text: Optional[str] = None) -> Path:
    tokens = shard_arrays(out, num_batches, ("tokens",))["tokens"]
    extra = {} if manifest_text is None else {"manifest": np.array(manifest_text)}
    save_npz(npz_path, tokens=tokens, labels=np.asarray(labels, dtype=np.int64), **extra)
    return npz_path


# ------------------------------------------------------------------- the output folder
def npz_manifest(npz_path: Path) -> Optional[dict]:
    """The manifest stored in one of our npz files, or None if it has none."""
    try:
        with zipfile.ZipFile(npz_path) as zf:
            if "manifest.npy" not in zf.namelist():
                return None
            with zf.open("manifest.npy") as f:
                return mf.parse(str(np.lib.format.read_array(f)), str(npz_path))
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(f"cannot read the manifest of '{npz_path}' ({err}): move that file away or "
                          f"pass sample.overwrite=True to replace it") from err


PNG_NAME = r"\d{6,}\.png"
SHARD_NAME = r"batch_\d{6,}\.npz"


def _ours(name: str) -> str:
    """The name pattern of a file of ours, or of atomic_write's temporary of it."""
    return rf"(?:{name}|\.(?:{name})\.\d+\.tmp)"


def output_files(out: Path) -> list[Path]:
    """Every file a run of ours writes for this output_dir, and nothing else: PNGs, shards,
    the manifest, the npz files, the metrics and the temporaries of each (a user's own files in
    the folder, or a PNG of another name, are not ours). The lock file is not listed."""
    files = []
    beside = [f"{out.name}.npz", f"{out.name}_tokens.npz", f"{out.name}.metrics.json"]
    for folder, pattern in ((out, _ours(PNG_NAME) + "|" + _ours(re.escape(mf.FILENAME))),
                            (out / "shards", _ours(SHARD_NAME)),
                            (out.parent, "|".join(_ours(re.escape(name)) for name in beside))):
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if re.fullmatch(pattern, p.name) and p.is_file())
    return files


def previous_manifest(out: Path) -> Optional[dict]:
    """The manifest of what is already in output_dir (its manifest.json, else an npz's)."""
    if manifest_path(out).is_file():
        try:
            return mf.parse(manifest_path(out).read_text(), str(manifest_path(out)))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{err}: pass sample.overwrite=True to start this output_dir afresh") from err
    for npz in (Path(f"{out}.npz"), Path(f"{out}_tokens.npz")):
        if npz.is_file() and (found := npz_manifest(npz)) is not None:
            return found
    return None


def prepare_output(out: Path, manifest: dict, overwrite: bool) -> tuple[dict, str]:
    """Decide what to do with an existing output_dir, then write the manifest.

    Returns (the manifest written, a note for the log).

    Refuses (ConfigError) when the folder holds samples of other settings; removes them
    first with `overwrite`; regenerates a partial last batch whole when a run is extended.
    """
    existing = output_files(out)
    old = previous_manifest(out) if existing else None
    note = "new run"
    if overwrite and existing:
        for path in existing:
            path.unlink(missing_ok=True)
        _remove_if_empty(out / "shards")
        note = f"sample.overwrite=True: removed {len(existing)} files of the previous run"
    elif existing and old is None:
        raise ConfigError(f"output_dir '{out}' holds samples but no manifest (made by an older version?), so "
                          f"their settings are unknown: use another --experiment.output_dir, or pass "
                          f"--sample.overwrite=True to delete them and start again")
    elif old is not None:
        manifest, note = _continue(out, old, manifest)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(manifest_path(out), lambda tmp: tmp.write_text(mf.to_json(manifest)))
    return manifest, note


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or it holds files that are not ours
        pass


def _continue(out: Path, old: dict, manifest: dict) -> tuple[dict, str]:
    """Resume or extend the run recorded in `old`, or refuse when its settings differ."""
    for change in mf.recorded_changes(old, manifest):
        print(f"warning: the environment changed since this output_dir was started ({change}); resuming "
              f"anyway, but the new samples may differ slightly in floating point", file=sys.stderr)
    kind = mf.verdict(old, manifest)
    if kind == "differ":
        raise ConfigError(f"output_dir '{out}' holds samples made with other settings: "
                          f"{mf.describe_differences(old, manifest)}. Use another --experiment.output_dir, "
                          f"or pass --sample.overwrite=True to delete the old samples")
    if kind == "extend":
        old_n, batch = old["images"]["sample.num_fid_samples"], manifest["images"]["sample.per_proc_batch_size"]
        partial = mf.partial_last_batch(old_n, batch)
        if partial is not None:  # its row count changes, so its draws do: remake it whole
            k, indices = partial
            for path in [png_path(out, i) for i in indices] + [shard_path(out, k)]:
                path.unlink(missing_ok=True)
        note = f"extending from {old_n} to {manifest['images']['sample.num_fid_samples']} samples"
    else:
        note = "resuming"
        manifest = {**manifest, "recorded": {**manifest["recorded"],
                                             "created": old.get("recorded", {}).get("created")}}
    # A tokens-only rerun must not forget which decoder made the PNGs already here.
    kept = {k: v for k, v in old["images"].items() if k.startswith(mf.DECODER_PREFIX)}
    return {**manifest, "images": dict(sorted({**kept, **manifest["images"]}.items()))}, note


def check_manifest_unchanged(out: Path, manifest: dict) -> str:
    """Before the npz: the folder still holds this run's samples; returns the manifest text to embed."""
    try:
        text = manifest_path(out).read_text()
        on_disk = mf.parse(text, str(manifest_path(out)))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{manifest_path(out)} vanished or broke while sampling ({err}); "
                          f"rerun the same command to resume") from err
    if mf.verdict(on_disk, manifest) != "resume":
        raise ConfigError(f"another run changed {manifest_path(out)} while this one sampled "
                          f"({mf.describe_differences(on_disk, manifest)}); the npz was not written. "
                          f"Give each run its own --experiment.output_dir")
    return text


# ------------------------------------------------------------------ whose files these are
def batch_files(out: Path, k: int, indices: range, layout: Layout) -> list[Path]:
    """The files of batch k: its shard, then its PNGs in order."""
    return [shard_path(out, k)] + [png_path(out, i) for i in indices] * layout.pngs


def batches_on_disk(out: Path, plan, layout: Layout) -> int:
    """How many batches of `plan` are finished (for messages)."""
    return sum(batch_done(out, k, plan[k], layout) for k in range(len(plan)))


class Ledger:
    """What this process wrote: one digest per batch of the (inode, size, mtime) of its files,
    taken right after they were renamed into place.

    Before the npz is written, every batch must be in the ledger of one of the run's
    processes and unchanged, or be older than the run (resumed): a file that another process,
    one that ignored the lock, wrote or replaced in the meantime is never mixed in.
    """

    def __init__(self, out: Path):
        self.out, self.batches = out, {}

    def record(self, k: int, files: list[Path]) -> None:
        self.batches[k] = _digest(files)


def _digest(files: list[Path]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        st = os.stat(path)
        digest.update(f"{path.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.digest()


def _batch_is_ours(files: list[Path], digest: Optional[bytes], started_ns: int) -> bool:
    try:
        if digest is not None:
            return _digest(files) == digest
        return all(os.stat(path).st_mtime_ns <= started_ns for path in files)
    except FileNotFoundError:
        return False


def check_ownership(out: Path, plan, written: dict, started_ns: int, layout: Layout) -> None:
    """ConfigError unless every batch of `plan` is this run's: written by it (`written`, the
    merged ledgers) and unchanged since, or older than the run's start (`started_ns`, on the
    folder's clock: an earlier run of the same settings, resumed).

    The files of a batch that fails are moved to `out/foreign/` (kept, never mixed in), so a
    rerun draws that batch again.
    """
    foreign = []
    for k in range(len(plan)):
        files = batch_files(out, k, plan[k], layout)
        if _batch_is_ours(files, written.get(k), started_ns):
            continue
        foreign.append(k)
        for path in files:
            if path.exists():
                target = out / "foreign" / path.relative_to(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    if foreign:
        shown = ", ".join(map(str, foreign[:5])) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"the npz was not written: files of {len(foreign)} batch(es) in '{out}' (batches "
                          f"{shown}) were written or replaced by another process while this run sampled; "
                          f"something that ignores the folder's lock writes there, so give each run its own "
                          f"--experiment.output_dir. Those files were moved to '{out / 'foreign'}': rerun this "
                          f"command to draw those batches again")
