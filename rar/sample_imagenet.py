"""Sample ImageNet 256x256 with RAR and CFG / SoftCFG, for FID evaluation.

    torchrun --nproc_per_node=8 rar/sample_imagenet.py --config configs/rar_xl.yaml \
        --experiment.output_dir=outputs/rar_xl_softcfg \
        --experiment.generator_checkpoint=weights/rar_xl.bin \
        --model.vq_model.pretrained_tokenizer_weight=weights/maskgit-vqgan-imagenet-f16-256.bin \
        --model.generator.softcfg_strength=1

Same CLI, determinism, resume and output as alitok/sample_imagenet.py (every family's
sampler is the generic runner of softcfg_patch/run/); `--help` lists every option.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from softcfg_patch.run import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point("rar")
