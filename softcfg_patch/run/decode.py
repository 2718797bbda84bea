"""Rebuild the images of a finished run from its tokens (scripts/decode_tokens.py).

Every run keeps its tokens in its shards, and its manifest records the whole config, so the
images of a `sample.images=none` (or tokens-only) run can be made later, exactly as the run
would have made them: the same decoder file (checked by SHA-256 against the manifest), the
same precision, and batch by batch as the run decoded them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ..errors import ConfigError
from ..files import file_identity
from ..precision import tf32
from ..shards import Layout, shard_arrays, shard_complete, shard_path
from . import manifest as mf
from . import output as io
from .config import find_file, schema
from .registry import get


def read_run(out: Path) -> tuple[dict, str, list]:
    """(manifest, its text, the sample ranges of every batch) of a finished run folder."""
    path = io.manifest_path(out)
    try:
        text = path.read_text()
        manifest = mf.parse(text, str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{out}' is not a sampler's output_dir ({err}); pass the folder a run wrote") from None
    recorded = manifest.get("recorded", {})
    if "config" not in recorded or "family" not in recorded:
        raise ConfigError(f"{path} records no config (written by an older version): its tokens cannot be decoded "
                          f"here; sample it again")
    n, batch = manifest["images"]["sample.num_fid_samples"], manifest["images"]["sample.per_proc_batch_size"]
    plan = [range(s, min(s + batch, n)) for s in range(0, n, batch)]
    missing = [k for k, rows in enumerate(plan) if not shard_complete(shard_path(out, k), rows, Layout("none"))]
    if missing:
        raise ConfigError(f"'{out}' is unfinished: {len(missing)} of {len(plan)} shards are missing or incomplete "
                          f"(batch {missing[0]} first); rerun its sampler command to finish it")
    return manifest, text, plan


def run_decoder(manifest: dict, decoder: Optional[str], device: torch.device):
    """The run's image decoder, from its recorded config and the decoder file it used (or `decoder`)."""
    family = get(manifest["recorded"]["family"])
    config = OmegaConf.merge(OmegaConf.structured(schema(family)), manifest["recorded"]["config"])
    item = next((c for c in family.checkpoints if c.decoder_only), None)
    path = decoder or (OmegaConf.select(config, item.key) if item else None)
    if item is not None:
        found, tried = find_file(str(path)) if path not in (None, "???") else (None, [])
        if found is None:
            raise ConfigError(f"the {item.what} of this run ({path}) is not found (tried "
                              f"{', '.join(map(str, tried)) or 'nothing'}): pass --decoder PATH (from {item.source})")
        want = manifest["images"].get(f"{item.manifest_name}.sha256")
        if want and file_identity(found)["sha256"] != want:
            raise ConfigError(f"{found} is not the {item.what} this run was sampled with (SHA-256 differs from "
                              f"{want[:12]}... in its manifest): pass --decoder with that file")
        path = str(found)
    return family.resolve("image_decoder")(config, path, device, source=item.source if item else ""), config


def decoded_batches(out: Path, plan: list, decode, precision: str, device: torch.device) -> Iterator[np.ndarray]:
    """uint8 images of every batch in order, decoded as the run decoded them."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with tf32(precision in ("tf32", "bf16")), torch.no_grad():
        for k in tqdm(range(len(plan)), desc="decoding", unit="batch"):
            with np.load(shard_path(out, k)) as shard:
                tokens = torch.from_numpy(shard["tokens"].astype(np.int64)).to(device)
            with autocast:
                images = decode(tokens)
            yield images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)


def decode_run(out: Path, npz: Optional[Path] = None, png_dir: Optional[Path] = None, decoder: Optional[str] = None,
               device: str = "auto", overwrite: bool = False) -> Path:
    """Write the images of run `out` to `npz` (default <output_dir>.npz: arr_0, labels, manifest,
    as the run would have written it) or as PNGs into `png_dir`; returns what was written."""
    out = Path(out).resolve()
    manifest, text, plan = read_run(out)
    target = png_dir or npz or Path(f"{out}.npz")
    if target.exists() and not overwrite and (png_dir is None or any(Path(target).glob("*.png"))):
        raise ConfigError(f"{target} already exists: pass --overwrite to replace it, or another --out / --png")
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    decode, config = run_decoder(manifest, decoder, torch_device)
    batches = decoded_batches(out, plan, decode, config.sample.precision, torch_device)
    n = manifest["images"]["sample.num_fid_samples"]
    if png_dir is not None:
        for rows, images in zip(plan, batches):
            for i, image in zip(rows, images):
                io.save_png(io.png_path(Path(png_dir), i), image)
        return Path(png_dir)
    labels = shard_arrays(out, len(plan), ("labels",))["labels"]
    return io.write_images_npz(batches, n, Path(target), labels, text)
