"""The sampling runner and the model registry, apart from the method (softcfg_patch).

    registry    one entry per model family (MODELS, register, get)
    config      OmegaConf structured schema per family, the command line, --help
    runner      distributed set-up, batch plan, manifest, the sampling loop, main
    output      PNG / token / npz files, atomic writes, the output folder's state
    manifest    what made the samples in an output folder (pure functions)

A family's entry point is two lines: `from softcfg_patch.run import entry_point;
entry_point("alitok")`. Nothing here imports a model family until it samples one.
"""
from .config import parse_cli
from .output import atomic_write
from .registry import MODELS, Checkpoint, ModelFamily, Option, get, register
from .runner import entry_point, main, run_sampling

__all__ = ["MODELS", "ModelFamily", "Option", "Checkpoint", "register", "get", "parse_cli", "main",
           "run_sampling", "entry_point", "atomic_write"]
