"""The SoftCFG multiplier table, a static KV cache, and the one attention function models call.

The cache is preallocated for the whole sequence (gpt-fast style): writing a step is
an index copy, never a `torch.cat`. K and V are stored *unscaled*; SoftCFG's current
multipliers live beside them in one `MultiplierTable` ([rows, positions], ones for rows
and positions that are not scaled) and are applied on the fly, so they can never
compound across steps. The Hugging Face caches (softcfg_patch.hf) use the same table.

For the default target "v", with a single query per step
    sum_i p_i (m_i v_i) = sum_i (p_i m_i) v_i,
so the multipliers scale the attention probabilities instead of V: [rows, heads, L]
work instead of [rows, heads, L, head_dim], and no copy of the cache. Target "k"
scales the scores (q . m_i k_i = m_i (q . k_i)) before the softmax.

Two ways to decode one position:
* sliced (eager default): `pos` is a Python int, attention reads `[:pos + 1]`; the
  arithmetic of the upstream code, so tokens stay identical to the golden runs.
* fixed shape (`use_fixed_shape()`, for torch.compile / CUDA graphs): the position is
  a 0-d tensor (`position`), K/V are written with `index_copy_` and the query attends
  over the whole preallocated cache with a mask, so every step has the same shapes
  and one compiled graph serves all steps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .guidance import TARGETS

Rows = Union[torch.Tensor, slice, Sequence[int]]


class MultiplierTable:
    """SoftCFG's per-(row, position) multipliers, float32 [rows, length], all ones at first.

    Written in place (`write`), so a compiled graph reading `values` sees new values
    without recompiling; `scale_k` / `scale_v` say which cache tensor they act on.
    """

    def __init__(self, rows: int, length: int, target: str = "v",
                 device: torch.device | str = "cpu") -> None:
        if target not in TARGETS:
            raise ValueError(f"softcfg_target must be one of {TARGETS}, got {target!r}")
        self.values = torch.ones(rows, length, device=device, dtype=torch.float32)
        self.scale_k, self.scale_v = "k" in target, "v" in target

    def write(self, rows: Rows, start: int, values: torch.Tensor) -> None:
        """Multipliers of positions [start, start + values.shape[1]) for `rows`."""
        self.values[rows, start:start + values.shape[1]] = values.to(torch.float32)

    def reset(self) -> None:
        self.values.fill_(1.0)

    def grow(self, length: int) -> None:
        """At least `length` columns, keeping what was written (growing caches only)."""
        if self.values.shape[1] < length:
            grown = self.values.new_ones(self.values.shape[0], max(length, 2 * self.values.shape[1]))
            grown[:, :self.values.shape[1]] = self.values
            self.values = grown


class StaticKVCache:
    """Preallocated keys/values of every layer for a batch of `batch_size` rows.

    `pos` is the number of positions already written. A model forward over T new
    positions calls `attend(layer, q, k, v)` once per layer (all with the same
    `pos`), then the driver calls `advance(T)`. In fixed-shape mode the driver sets
    `position` (a 0-d tensor) instead and forwards one position at a time.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int,
                 head_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        # One tensor per layer, not views of one: a compiled step then updates each in
        # place (a write into a view of one big input would copy the whole cache per layer).
        shape = (batch_size, num_heads, max_len, head_dim)
        self.layer_keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.layer_values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.pos = 0
        # Per-sequence values a model computes in prefill() and reuses in decode()
        # (e.g. RAR's class embedding for adaLN). Models own the keys.
        self.state: dict = {}
        self.scale = 1.0 / math.sqrt(head_dim)
        self.multipliers: Optional[MultiplierTable] = None  # SoftCFG; None means all ones
        self.position: Optional[torch.Tensor] = None  # fixed-shape mode: the decoded position
        self.key_positions: Optional[torch.Tensor] = None

    def enable_multipliers(self, target: str = "v") -> MultiplierTable:
        """Allocate the (all ones) multiplier table; `target` is "v", "k" or "kv"."""
        first = self.layer_keys[0]
        self.multipliers = MultiplierTable(first.shape[0], self.max_len, target, first.device)
        return self.multipliers

    def use_fixed_shape(self) -> None:
        """Decode through `position` (a 0-d long tensor the driver fills) with full-cache masks."""
        device = self.layer_keys[0].device
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.key_positions = torch.arange(self.max_len, device=device)

    def reset(self) -> None:
        """Reuse for a new batch of the same shape: nothing of the old one can leak in."""
        for t in (*self.layer_keys, *self.layer_values):
            t.zero_()
        self.pos = 0
        self.state.clear()
        if self.multipliers is not None:
            self.multipliers.reset()

    def advance(self, num_positions: int) -> None:
        self.pos += num_positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v at the current positions and attend causally over the cache.

        q, k, v: [rows, heads, T, head_dim] for the T new positions. Returns
        [rows, heads, T, head_dim].
        """
        if self.position is not None and q.shape[2] == 1 and self.pos > 0:
            return self._attend_fixed(layer, q, k, v)
        start, T = self.pos, q.shape[2]
        end = start + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: writing position {end - 1} into a cache of "
                               f"{self.max_len} positions")
        self.layer_keys[layer][:, :, start:end] = k
        self.layer_values[layer][:, :, start:end] = v
        keys, values = self.layer_keys[layer][:, :, :end], self.layer_values[layer][:, :, :end]
        if T == 1 and self.multipliers is not None:
            return self._attend_weighted(q, keys, values, self.multipliers.values[:, None, None, :end])
        mask = None
        if T > 1:  # a chunk attends to everything before it and causally within itself
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _attend_fixed(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query at `position` over the whole cache; later positions are masked out."""
        keys, values = self.layer_keys[layer], self.layer_values[layer]
        index = self.position.view(1)
        keys[:, :, index] = k.to(keys.dtype)  # an in-place index_put_; cast as the sliced write
        values[:, :, index] = v.to(values.dtype)
        visible = (self.key_positions <= self.position)[None, None, None, :]
        weights = None if self.multipliers is None else self.multipliers.values[:, None, None, :]
        return self._attend_weighted(q, keys, values, weights, visible)

    def _attend_weighted(self, q, keys, values, weights, visible=None):
        scores = (q @ keys.transpose(-1, -2)) * self.scale
        if weights is not None and self.multipliers.scale_k:
            scores = scores * weights
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.float().softmax(dim=-1)
        if weights is not None and self.multipliers.scale_v:
            probs = probs * weights
        return probs.to(values.dtype) @ values


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: StaticKVCache | None,
                     layer: int, dropout_p: float = 0.0) -> torch.Tensor:
    """The attention every model layer calls: through the cache when decoding, else a
    plain causal pass over the whole sequence (training, teacher forcing)."""
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return cache.attend(layer, q, k, v)
