"""Building blocks shared by several model families (not part of the method).

A family package imports these instead of another family's files, so no family
depends on another: RMSNorm, the SwiGLU MLP, interleaved rotary embeddings with a 2-D
grid table, `at_step` (reading a position table at the decode step), and the
decoder-output -> uint8 image conversions.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Normalised in float32 and cast back before the weight, as the references do."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free (the Llama MLP; AliTok and LlamaGen key it w1/w2/w3)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rotary_table(head_dim: int, prefix_len: int = 17, grid_size: int = 16,
                 base: float = 10000.0) -> torch.Tensor:
    """(cos, sin) per dimension pair for every position, [1 + prefix_len + grid_size**2, head_dim/2, 2].

    Row 0 (the class condition) is all zeros, so its q and k vanish after rotation.
    Rows 1..prefix_len: 1-D RoPE at positions 0..prefix_len-1. Then the grid in raster
    order: the first half of the pairs rotate with the row index, the second half with
    the column index, both offset by prefix_len.
    """
    ambient = torch.empty(0).device  # the caller's default device (meta while a loader builds)
    with torch.device("cpu"):  # a small table: on meta, these ops would import torch._dynamo
        table = _rotary_table(head_dim, prefix_len, grid_size, base)
    return table.to(ambient)


def _rotary_table(head_dim: int, prefix_len: int, grid_size: int, base: float) -> torch.Tensor:
    half = head_dim // 2
    freqs_1d = 1.0 / (base ** (torch.arange(0, head_dim, 2)[:half].float() / head_dim))
    angles_1d = torch.outer(torch.arange(prefix_len).float(), freqs_1d)

    freqs_2d = 1.0 / (base ** (torch.arange(0, half, 2)[:half // 2].float() / half))
    axis = torch.outer(torch.arange(prefix_len, prefix_len + grid_size).float(), freqs_2d)
    angles_2d = torch.cat([axis[:, None, :].expand(-1, grid_size, -1),
                           axis[None, :, :].expand(grid_size, -1, -1)], dim=-1).flatten(0, 1)

    angles = torch.cat([angles_1d, angles_2d])
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(1, half, 2), table])


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, H, T, D] by table [T, D/2, 2], in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = table[..., 0], table[..., 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


def at_step(table: torch.Tensor, step) -> torch.Tensor:
    """table[step:step + 1] for an int step (eager decoding) or a 0-d tensor step (the compiled
    fixed-shape step: a gather, so no host sync and no recompile per step)."""
    if torch.is_tensor(step):
        return table.index_select(0, step.view(1))
    return table[step:step + 1]


def unit_to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] -> [B, H, W, 3] uint8 (AliTok, RAR: clamp, x255, truncate)."""
    return _to_uint8_hwc(images, scale=255.0, offset=0.0)


def signed_to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float in [-1, 1] -> [B, H, W, 3] uint8 (LlamaGen: 127.5 x + 128, clamp, truncate)."""
    return _to_uint8_hwc(images, scale=127.5, offset=128.0)


def _to_uint8_hwc(images: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    # float32 first: x * 255 in bf16 would land on the wrong integer
    return (scale * images.float() + offset).clamp(0.0, 255.0).permute(0, 2, 3, 1).to(torch.uint8)
