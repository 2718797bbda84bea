"""The one checkpoint loader for generators, tokenizers and Inception networks.

Only tensors are ever deserialised: safetensors files, or `torch.load(weights_only=True,
mmap=True)` for the .bin/.pth/.pt files the upstream projects publish. A model is built
on the meta device (no random init of a 1-3B network that the file overwrites) and
loaded with `load_state_dict(assign=True)`, so the weights are never held twice.
"""
from __future__ import annotations

import argparse
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .errors import CheckpointError, MissingFileError

__all__ = ["CheckpointError", "read_state_dict", "check_state_dict", "load_state", "load_model", "load_checkpoint",
           "looks_like_html", "html_message"]

# Where a file comes from, when the caller does not say (the runner passes the registry's text).
UNKNOWN_SOURCE = "the model's official release (see the README's checkpoint table)"
# Wrappers some training scripts put around the state dict (DDP "model", DeepSpeed "module", ...).
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module", "generator", "ema")
# Prefixes of saved wrapped modules: DistributedDataParallel, torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
# Plain containers training scripts save beside the weights (LlamaGen's DDP files keep their
# argparse args); weights_only loading may rebuild these, nothing else.
_SAFE_CONTAINERS = [argparse.Namespace]


def read_state_dict(path: str | Path, *, what: str, source: str,
                    error: type[CheckpointError] = CheckpointError) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict (CPU, memory-mapped where possible).

    what:   a human name of the model, e.g. "AliTok-XL generator".
    source: where the official file is published, quoted in every error.
    error:  the CheckpointError subclass to raise (e.g. the evaluator's InceptionWeightsError).
    Every error is one line: what was wrong, and where to get a good file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"{what} checkpoint not found: '{path}'. Download the official file from {source} "
            f"and pass its path (nothing is downloaded automatically).")
    if looks_like_html(path):
        raise error(html_message(path, what, source))
    try:
        state = _load_file(path)
    except Exception as err:  # corrupt, truncated, pickled objects, or not a checkpoint at all
        refused = _refused_global(err)
        if refused:
            raise error(_pickle_message(path, what, source, refused)) from err
        reason = _reason(err)
        raise error(
            f"could not read {what} checkpoint '{path}' ({type(err).__name__}{': ' + reason if reason else ''}; "
            f"only tensors are loaded, with weights_only=True): the file is truncated, corrupt, not a "
            f"PyTorch/safetensors checkpoint, or holds pickled objects; download it again from {source}") from err
    return _unwrap(state, path, what, source, error)


def _weights_only_detail(err: Exception) -> str | None:
    """The weights-only unpickler's own reason (e.g. "Unsupported global: GLOBAL os.system was
    not an allowed global by default."), without torch's paragraph of advice around it ("" when
    torch gives none); None for errors that are not a weights-only refusal."""
    text = str(err)
    if not isinstance(err, pickle.UnpicklingError) or not text.startswith("Weights only load failed"):
        return None
    detail = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else ""
    return detail.splitlines()[0].strip() if detail else ""


def _refused_global(err: Exception) -> str | None:
    """The class or function a full pickle needs (what weights_only=True refuses), if that is the error."""
    match = re.match(r"Unsupported (?:global: GLOBAL|class) (\S+)", _weights_only_detail(err) or "")
    return match.group(1) if match else None


def _reason(err: Exception) -> str:
    """One short line of why torch/safetensors failed: the weights-only unpickler's reason (its
    message opens with a paragraph of advice that does not fit a line), else the first line."""
    detail = _weights_only_detail(err)
    if detail is not None:
        return detail[:200] or "refused by the weights-only unpickler"
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _pickle_message(path: Path, what: str, source: str, refused: str) -> str:
    """Why a full pickle is refused, what is accepted, and how to convert a file one trusts."""
    return (f"could not read {what} checkpoint '{path}': it holds pickled objects (it needs '{refused}', which is "
            f"not a tensor), refused because unpickling can run arbitrary code. Accepted: safetensors files, or a "
            f"plain state dict of tensors saved with torch.save(model.state_dict(), path), which loads with "
            f"torch.load(path, weights_only=True). To convert the file, only if you trust its source, in a trusted "
            f"environment: obj = torch.load(path, weights_only=False); torch.save(obj.state_dict(), 'fixed.pth') "
            f"(for a dict, save its tensors), or save them with safetensors.torch.save_file; otherwise download "
            f"the official file from {source}")


def _load_file(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    with torch.serialization.safe_globals(_SAFE_CONTAINERS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # files in the legacy (pre-zip) format cannot be mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def looks_like_html(path: str | Path) -> bool:
    """True for a web page saved under a checkpoint's name (a download link that led to a
    sign-in or "virus scan" page instead of the file). Reads the first kilobyte only."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head")) or (
        head.startswith(b"<") and b"<html" in head)


def html_message(path: str | Path, what: str, source: str) -> str:
    return (f"{what} '{path}' is not a checkpoint: it looks like an HTML page; use the direct download "
            f"link (from {source}) and save the file itself")


def _unwrap(state, path: Path, what: str, source: str, error: type[CheckpointError]) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise error(f"'{path}' does not hold a {what} state dict (found {type(state).__name__}); "
                              f"expected a state dict of tensors, raw or under \"model\", \"module\" or "
                              f"\"state_dict\", as in the files from {source}")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_dict(module: torch.nn.Module, state: dict, *, path, what: str, source: str,
                     architecture: str = "", error: type[CheckpointError] = CheckpointError) -> None:
    """CheckpointError listing missing, unexpected and mis-shaped keys (first five of each)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"'{path}' does not match the {what} architecture{f' ({architecture})' if architecture else ''}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            lines.append(f"  {title}: {shown}")
    lines.append(f"Check that the config matches the checkpoint (model size), or get the official "
                 f"file from {source}.")
    raise error("\n".join(lines))


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], *, path, what: str, source: str,
               architecture: str = "", error: type[CheckpointError] = CheckpointError,
               zero_fill: tuple[str, ...] = (), assign: bool = True) -> torch.nn.Module:
    """Strictly load an already read `state` into `module`: the one core of every loader.

    zero_fill: key suffixes a file may leave out (e.g. "num_batches_tracked", BN counters some
               converters drop); missing ones are filled with zeros of the module's shape.
    Floating tensors take the module's dtype; with assign=True the module keeps the file's
    tensors (no copy; what a meta-built module needs). Errors are `error`s, as check_state_dict.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and k.endswith(zero_fill)] if zero_fill else []
    if missing:
        state = {**state, **{k: torch.zeros_like(expected[k], device="cpu") for k in missing}}
    check_state_dict(module, state, path=path, what=what, source=source, architecture=architecture, error=error)
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
    return module


# The in-place initialisers of torch.nn.init that layers call from reset_parameters().
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                "orthogonal_", "sparse_")


@contextmanager
def meta_build() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers.

    Every value is replaced by the checkpoint, so initialising is wasted work; and on meta
    tensors `normal_` goes through a Python reference kernel whose first call imports
    torch._dynamo (about 3 s of every sampler's start-up on a CPU).
    """
    saved = {name: getattr(torch.nn.init, name) for name in INITIALISERS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, _leave_as_is)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _leave_as_is(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def load_model(build: Callable[[], torch.nn.Module], path: str | Path, *, what: str, source: str,
               architecture: Optional[str] = None,
               state: Optional[dict[str, torch.Tensor]] = None) -> torch.nn.Module:
    """Build `build()` on the meta device and strictly load `path` (or an already read `state`) into it.

    Floating tensors take the model's dtype (float32 parameters from a bf16 file); a module
    whose non-persistent buffers are computed rather than loaded (rotary tables) gets them
    back from its `init_buffers(device)`. Returns the model on CPU, eval mode, no grads.
    """
    if state is None:
        state = read_state_dict(path, what=what, source=source)  # fails fast, before building
    with meta_build():
        model = build()
    load_state(model, state, path=path, what=what, source=source,
               architecture=architecture if architecture is not None else getattr(model, "architecture", ""))
    if any(b.is_meta for b in model.buffers()):
        if not hasattr(model, "init_buffers"):
            raise TypeError(f"{type(model).__name__} has computed buffers: give it init_buffers(device)")
        model.init_buffers("cpu")
    return model.eval().requires_grad_(False)


def load_checkpoint(module: torch.nn.Module, path: str | Path, *, what: str, source: str,
                    architecture: str = "") -> torch.nn.Module:
    """Strictly load `path` into an already built `module` (tests and small models), copying
    into its tensors (device and dtype kept)."""
    state = read_state_dict(path, what=what, source=source)
    return load_state(module, state, path=path, what=what, source=source, architecture=architecture,
                      assign=False)
