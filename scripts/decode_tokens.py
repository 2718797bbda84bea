#!/usr/bin/env python
"""Rebuild the images of a finished run from the tokens in its shards.

    python scripts/decode_tokens.py OUTPUT_DIR                 # -> OUTPUT_DIR.npz (arr_0, labels, manifest)
    python scripts/decode_tokens.py OUTPUT_DIR --out X.npz     # another npz
    python scripts/decode_tokens.py OUTPUT_DIR --png DIR       # one PNG per sample, 000000.png ...

The images equal those the run would have written with sample.images=png or shards: the
decoder file the run used (its SHA-256 is checked against the run's manifest; --decoder
points at it when it moved), the run's precision, batch by batch. Works for every run,
including sample.images=none and sample.tokens_only=True.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from softcfg_patch.errors import exit_on_error  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", type=Path, help="the run's experiment.output_dir")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="npz to write (default: OUTPUT_DIR.npz)")
    where.add_argument("--png", type=Path, metavar="DIR", help="write PNGs into DIR instead of an npz")
    p.add_argument("--decoder", help="the decoder checkpoint (default: the path the run recorded)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing npz or PNGs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_error():
        from softcfg_patch.run.decode import decode_run
        written = decode_run(args.output_dir, args.out, args.png, args.decoder, args.device, args.overwrite)
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
