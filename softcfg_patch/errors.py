"""The one exception family of the project: bad input the user can fix.

Library code raises a `SoftCFGError` (never `SystemExit`); every command-line entry point
(samplers, scripts/run_setting.py, the evaluator, compare, the demo, the t2i scripts)
turns it into `error: <message>` on stderr and exit status 2 (`exit_on_error`).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class SoftCFGError(Exception):
    """Bad input (a setting, a file, a folder); the message says what is wrong and how to fix it."""


class ConfigError(SoftCFGError, ValueError):
    """A bad config file or command-line option."""


class CheckpointError(SoftCFGError, ValueError):
    """A checkpoint file that exists but cannot be used."""


class MissingFileError(SoftCFGError, FileNotFoundError):
    """A file the run needs is not there (nothing is downloaded automatically)."""


def report(err: SoftCFGError, printed: bool = False) -> SoftCFGError:
    """Print `error: ...` now (unless `printed`: another process has) and mark `err` as
    reported, so `exit_on_error` does not print it again; returns `err` to raise."""
    if not printed:
        print(f"error: {err}", file=sys.stderr, flush=True)
    err.reported = True
    return err


@contextmanager
def exit_on_error(show=lambda: True) -> Iterator[None]:
    """Turn a SoftCFGError into `error: ...` on stderr and exit status 2; a `with` block or
    a decorator (`@exit_on_error()` over a script's `main`).

    `show()` decides whether this process prints; an error already `report`ed is not printed again.
    """
    try:
        yield
    except SoftCFGError as err:
        if show() and not getattr(err, "reported", False):
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
