"""Sample ImageNet with LlamaGen and CFG / SoftCFG, for FID evaluation.

    torchrun --nproc_per_node=8 llamagen/sample_imagenet.py --config configs/llamagen_xl.yaml \
        --experiment.output_dir=outputs/llamagen_xl_softcfg \
        --experiment.generator_checkpoint=weights/c2i_XL_384.pt \
        --experiment.tokenizer_checkpoint=weights/vq_ds16_c2i.pt \
        --model.generator.softcfg_strength=1

Same CLI, determinism, resume and output as alitok/sample_imagenet.py. The 384 models
are decoded at 384 and resized to 256 (bicubic) before the uint8 conversion, as
upstream; `sample.labels=random` draws the classes like upstream's torch.randint.
`--help` lists every option.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from softcfg_patch.run import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point("llamagen")
