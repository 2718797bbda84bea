"""Lazy package exports (PEP 562): a package's names are imported on first use.

Tools that only read the model registry or result rows then never import torch.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, sources: dict[str, str], submodules: tuple[str, ...] = (),
                 exported: tuple[str, ...] | list[str] = ()) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: name -> getattr(package.<sources[name]>, name),
    and each of `submodules` as an attribute, imported when first looked up."""
    def __getattr__(name: str):
        if name in sources:
            value = getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exported))

    return __getattr__, __dir__
