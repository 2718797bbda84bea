"""Safe checkpoint reading with errors that tell the user what to do.

Only tensors are ever deserialised: safetensors files, or `torch.load(weights_only=True)`
for the .bin/.pth/.pt files the upstream projects publish.
"""
from __future__ import annotations

from pathlib import Path

import torch

class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be used; the message says why and what to do."""


# Wrappers some training scripts put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module", "generator", "ema")


def read_state_dict(path: str | Path, *, what: str, source: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict (on CPU).

    what:   a human name of the model, e.g. "AliTok-XL generator".
    source: where the official file is published, quoted in every error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint not found: '{path}'. Download the official file from {source} "
            f"and pass its path (nothing is downloaded automatically).")
    if looks_like_html(path):
        raise CheckpointError(html_message(path, what, source))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a tensor checkpoint at all
        raise CheckpointError(
            f"could not read {what} checkpoint '{path}' ({type(err).__name__}: {err}). The file is "
            f"truncated, corrupt or not a PyTorch/safetensors checkpoint; download it again from "
            f"{source}.") from err
    return _unwrap(state, path, what)


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


def _unwrap(state, path: Path, what: str) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a {what} state dict (found {type(state).__name__})")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(module: torch.nn.Module, path: str | Path, *, what: str, source: str,
                    architecture: str = "") -> torch.nn.Module:
    """Strictly load `path` into `module`, explaining any key or shape mismatch."""
    state = read_state_dict(path, what=what, source=source)
    check_state_dict(module, state, path=path, what=what, source=source, architecture=architecture)
    module.load_state_dict(state, strict=True)
    return module


def check_state_dict(module: torch.nn.Module, state: dict, *, path, what: str, source: str,
                     architecture: str = "") -> None:
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
    raise CheckpointError("\n".join(lines))
