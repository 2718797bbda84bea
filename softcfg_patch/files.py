"""File helpers below both the sampling runner and the evaluator: atomic writes (a reader never
sees half a file), numpy saves through them, leftover temporaries of killed writers, and a
file's identity (SHA-256 and size, read once).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["atomic_write", "remove_stale_temporaries", "save_npy", "save_npz", "file_identity"]


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


def file_identity(path: str | Path, chunk_bytes: int = 16 << 20) -> dict:
    """{"sha256": hex digest, "size": bytes} of a file, read once in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "size": size}
