"""Version strings of dependencies, compared as numbers (no `packaging` dependency)."""
from __future__ import annotations

import re

_RELEASE = re.compile(r"\s*v?(\d+(?:\.\d+)*)")


def version_tuple(text: str) -> tuple[int, ...]:
    """The release numbers a version string starts with: "1.16.0rc1" -> (1, 16, 0),
    "4.46.0.dev0" -> (4, 46, 0), "2.13.0+cpu" -> (2, 13, 0), "1.16rc1" -> (1, 16).

    Pre-release, dev and local suffixes are dropped: a 1.16 release candidate counts as 1.16.
    Compare with a tuple: `version_tuple(scipy.__version__) >= (1, 16)`.
    """
    match = _RELEASE.match(text)
    if match is None:
        raise ValueError(f"cannot read a version number from {text!r}; expected e.g. '1.16.0'")
    return tuple(int(part) for part in match.group(1).split("."))
