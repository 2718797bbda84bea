"""TF32 for a block of code, restored after: one switch for the samplers (tf32 like upstream)
and the evaluator (full float32: TF32 would move Inception features by ~1e-3)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 matmuls and convolutions inside the block; restore the old flags."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
