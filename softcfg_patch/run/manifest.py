"""The run manifest: what made the samples in an output folder, so a rerun never reuses
samples drawn with other settings.

`<output_dir>/manifest.json` is written before the first sample and copied into the
final npz (key `manifest`). Its layout (format 1):

    {"format": 1,
     "images":   {dotted key: value}   every setting that changes the images; a rerun
                                       resumes only when these match,
     "recorded": {dotted key: value}   paths, torch / CUDA / GPU, time; a change only warns}

Checkpoints are identified by content (SHA-256 and size), never by path. Everything
here is a pure function of its arguments (plus file reads), so it can be tested alone.
"""
from __future__ import annotations

import json
from typing import Optional

FORMAT = 1
FILENAME = "manifest.json"
# Keys of a decoder: a tokens-only run has none, and its tokens stay valid for a run that decodes.
DECODER_PREFIX = "tokenizer."
# Recorded keys whose change is worth a warning (the time always changes).
WARN_ON_CHANGE = ("torch", "cuda", "gpu", "device", "compile")


def project_version() -> str:
    """The version of the code that runs (softcfg_patch.__version__, not the installed metadata,
    which may describe another tree)."""
    from .. import __version__
    return __version__


def make_manifest(images: dict, recorded: dict) -> dict:
    return {"format": FORMAT, "images": dict(sorted(images.items())), "recorded": dict(recorded)}


def to_json(manifest: dict) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def parse(text: str, where: str) -> dict:
    """The manifest in `text`; ValueError naming `where` when it is not one."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), dict):
        raise ValueError(f"{where} is not a SoftCFG run manifest (no 'images' object)")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where} has manifest format {manifest.get('format')!r}; this version reads {FORMAT}")
    return manifest


def differences(old: dict, new: dict) -> dict:
    """{key: (old value, new value)} for every images key that differs.

    A key missing on one side shows as None, except decoder keys: tokens sampled without
    a decoder are the same tokens whatever decodes them later.
    """
    a, b = old["images"], new["images"]
    diff = {}
    for key in sorted(set(a) | set(b)):
        if key.startswith(DECODER_PREFIX) and (key not in a or key not in b):
            continue
        if a.get(key) != b.get(key):
            diff[key] = (a.get(key), b.get(key))
    return diff


def verdict(old: dict, new: dict) -> str:
    """"resume" (same images), "extend" (only num_fid_samples grew) or "differ"."""
    diff = differences(old, new)
    if not diff:
        return "resume"
    if list(diff) == ["sample.num_fid_samples"]:
        before, after = diff["sample.num_fid_samples"]
        if isinstance(before, int) and isinstance(after, int) and after > before:
            return "extend"
    return "differ"


def describe_differences(old: dict, new: dict) -> str:
    """One line: "sample.seed 0 -> 1, model.generator.guidance_scale 9.0 -> 13.0"."""
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in differences(old, new).items())


def recorded_changes(old: dict, new: dict) -> list[str]:
    """Human-readable changes of the environment worth a warning (never a refusal)."""
    a, b = old.get("recorded", {}), new.get("recorded", {})
    return [f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in WARN_ON_CHANGE if a.get(k) != b.get(k)]


def partial_last_batch(num_samples: int, batch_size: int) -> Optional[tuple[int, range]]:
    """(batch index, sample indices) of a last batch shorter than batch_size, else None.

    When a run is extended, that batch gets more rows; with another row count its random
    draws change, so its old samples must be regenerated whole.
    """
    if num_samples % batch_size == 0:
        return None
    k = num_samples // batch_size
    return k, range(k * batch_size, num_samples)


def _show(value) -> str:
    return "(absent)" if value is None else repr(value) if isinstance(value, str) else str(value)
