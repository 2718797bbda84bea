"""Sample ImageNet 256x256 with AliTok and CFG / SoftCFG, for FID evaluation.

    torchrun --nproc_per_node=8 alitok/sample_imagenet.py --config configs/alitok_xl.yaml \
        --experiment.output_dir=outputs/alitok_xl_softcfg \
        --experiment.generator_checkpoint=weights/alitok_xl.bin \
        --model.generator.guidance_scale=9 --model.generator.guidance_scale_pow=1.5 \
        --model.generator.softcfg_strength=1 --model.generator.step_norm=True

The upstream style (`config=configs/alitok_xl.yaml experiment.output_dir=...`) works
too; `--help` lists every option. Writes one PNG per sample and `<output_dir>.npz`.
The runner and the registry entry (softcfg_patch/run/) do the work.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from softcfg_patch.run import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point("alitok")
