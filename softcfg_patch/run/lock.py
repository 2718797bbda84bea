"""One run per output folder: an exclusive lock that rank 0 holds for the run's whole life.

Two samplers writing into one `output_dir` would mix their images (and `overwrite` would
delete the other's), so a run takes `output_dir/.lock` with `flock` before it touches
anything. The kernel releases the lock when the process exits, however it exits, so a
crashed run never leaves a stale lock behind and nothing ever needs cleaning up. The file
itself stays: deleting it would let a later run lock a new file while an earlier one still
holds the old. It records who holds it (pid, host, start time) for the second run's message.

On Linux, flock also works across hosts on NFS (emulated with POSIX record locks); a file
system that supports no locking at all gets a warning and the run goes on unlocked.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are unlocked (a warning says so)
    fcntl = None

FILENAME = ".lock"


class RunLock:
    """The held lock of one output folder; `release()` (or the process's exit) frees it."""

    def __init__(self, out: Path, fd: Optional[int], started_ns: int):
        self.out, self._fd = out, fd
        self.started_ns = started_ns  # the lock file's mtime: the run's start on the folder's clock

    @classmethod
    def acquire(cls, out: Path) -> "RunLock":
        """Lock `out` (created if needed) or raise ConfigError naming the run that holds it."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / FILENAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's details stay readable
        if fcntl is None:
            return cls._unlocked(out, fd, "this platform has no flock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"experiment.output_dir '{out}' is in use by another run ({holder(path)}); "
                              f"wait for it to finish or use another --experiment.output_dir") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
            return cls._unlocked(out, fd, err.strerror or str(err))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
        os.fsync(fd)
        return cls(out, fd, os.fstat(fd).st_mtime_ns)

    @classmethod
    def _unlocked(cls, out: Path, fd: int, reason: str) -> "RunLock":
        print(f"warning: cannot lock experiment.output_dir '{out}' ({reason}); make sure no other run "
              f"writes into it", file=sys.stderr)
        os.utime(fd)
        started = os.fstat(fd).st_mtime_ns
        os.close(fd)
        return cls(out, None, started)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def holder(path: Path) -> str:
    """'pid P on host H, started T' from a lock file, as far as it can be read."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is still writing its details
        return "its details are not written yet"
