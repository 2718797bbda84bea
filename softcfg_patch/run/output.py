"""What a run writes and how it finds what is already there: PNGs, token files, the
manifest and the npz archives. Every file is written to a temporary name and renamed
(`atomic_write`), so a file on disk is always complete.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError
from . import manifest as mf


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename: readers never see a half-written file. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if path.suffix == ".npz":  # a killed earlier npz write left a multi-GB temporary: remove it
        remove_stale_temporaries(path)


def remove_stale_temporaries(path: str | os.PathLike, min_age_s: float = 60.0) -> list[Path]:
    """Delete the `.NAME.PID.tmp` files that atomic_write left next to `path` when a process
    writing it was killed (they can be GBs). Kept: a file whose process is alive here, and one
    written in the last `min_age_s` seconds (a writer on another host sharing the folder)."""
    path, removed = Path(path), []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-4]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if time.time() - tmp.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: _with_file(tmp, lambda f: np.save(f, array)))


def save_npz(path: Path, *args: np.ndarray, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda tmp: _with_file(tmp, lambda f: np.savez(f, *args, **arrays)))


def _with_file(path: Path, write: Callable) -> None:
    with open(path, "wb") as f:  # numpy appends .npy/.npz to a bare name; a handle keeps ours
        write(f)


def png_path(out: Path, index: int) -> Path:
    return out / f"{index:06d}.png"


def token_path(out: Path, batch_index: int) -> Path:
    return out / "tokens" / f"batch_{batch_index:06d}.npy"


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


def tokens_complete(path: Path, rows: int) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape[0] == rows
    except (OSError, ValueError):
        return False


def batch_done(out: Path, k: int, indices: range, want_png: bool, want_tokens: bool) -> bool:
    """Every file of batch k is on disk and complete (a truncated file makes the batch run again)."""
    if want_tokens and not tokens_complete(token_path(out, k), len(indices)):
        return False
    return not want_png or all(png_complete(png_path(out, i)) for i in indices)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ConfigError(f"{path} is unreadable ({err}): delete it and rerun the same command "
                          f"(its batch is sampled again)") from err


def write_npz_from_pngs(out: Path, num_samples: int, npz_path: Path, labels: Optional[np.ndarray] = None,
                        manifest_text: Optional[str] = None) -> Path:
    """Stream the PNGs into `npz_path` as arr_0 [N, H, W, 3] uint8, one image in memory at a time.

    `labels` (int64 [N]) and `manifest_text` (0-d unicode array) are stored beside arr_0;
    the ADM evaluator reads arr_0 only.
    """
    first = _read_png(png_path(out, 0))
    shape = (num_samples, *first.shape)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in tqdm(range(num_samples), desc=f"writing {npz_path.name}", leave=False):
                    image = _read_png(png_path(out, i))
                    if image.shape != first.shape:
                        raise RuntimeError(f"{png_path(out, i)} has shape {image.shape}, expected {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
            for name, array in (("labels", None if labels is None else np.asarray(labels, dtype=np.int64)),
                                ("manifest", None if manifest_text is None else np.array(manifest_text))):
                if array is not None:
                    with zf.open(f"{name}.npy", "w") as member:
                        np.lib.format.write_array(member, array)
    atomic_write(npz_path, write)
    return npz_path


def write_tokens_npz(out: Path, num_batches: int, labels: np.ndarray, npz_path: Path,
                     manifest_text: Optional[str] = None) -> Path:
    tokens = np.concatenate([np.load(token_path(out, k)) for k in range(num_batches)])
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


def output_files(out: Path) -> list[Path]:
    """Every file a run of ours writes for this output_dir (PNGs, tokens, manifest, npz files)."""
    files = []
    if out.is_dir():
        files += [p for p in out.iterdir() if re.fullmatch(r"\d{6,}\.png|\.\d{6,}\.png\.\d+\.tmp", p.name)]
        files += sorted((out / "tokens").glob("batch_*.npy")) if (out / "tokens").is_dir() else []
        files += [manifest_path(out)] if manifest_path(out).is_file() else []
    files += [p for p in (Path(f"{out}.npz"), Path(f"{out}_tokens.npz")) if p.is_file()]
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
            path.unlink()
        shutil.rmtree(out / "tokens", ignore_errors=True)
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
            for path in [png_path(out, i) for i in indices] + [token_path(out, k)]:
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
