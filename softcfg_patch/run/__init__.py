"""The sampling runner and the model registry, apart from the method (softcfg_patch).

    registry    one entry per model family (MODELS, register, get)
    config      OmegaConf structured schema per family, the command line, --help
    runner      distributed set-up, batch plan, manifest, the sampling loop, main
    output      PNG / shard / npz files and the output folder's state (atomic writes: softcfg_patch.files)
    manifest    what made the samples in an output folder (pure functions)
    evaluation  evaluate while sampling: Inception activations per batch, the ADM metrics at the end
    decode      rebuild a run's images from the tokens in its shards (scripts/decode_tokens.py)

A family's entry point is two lines: `from softcfg_patch.run import entry_point;
entry_point("alitok")`. Nothing here imports a model family until it samples one, and
the names are imported on first use (PEP 562): reading the registry does not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_SOURCES = {  # exported name -> submodule that defines it
    "parse_cli": "config",
    "MODELS": "registry", "Checkpoint": "registry", "ModelFamily": "registry", "Option": "registry",
    "get": "registry", "register": "registry",
    "entry_point": "runner", "main": "runner", "run_sampling": "runner", "decode_run": "decode",
}
_SUBMODULES = ("registry", "config", "runner", "output", "manifest", "evaluation", "decode")

__all__ = ["MODELS", "ModelFamily", "Option", "Checkpoint", "register", "get", "parse_cli", "main",
           "run_sampling", "entry_point", "decode_run"]

__getattr__, __dir__ = lazy_exports(__name__, _SOURCES, _SUBMODULES, __all__)

if TYPE_CHECKING:  # static analysers see the eager imports
    from .config import parse_cli
    from .decode import decode_run
    from .registry import MODELS, Checkpoint, ModelFamily, Option, get, register
    from .runner import entry_point, main, run_sampling
