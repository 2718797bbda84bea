"""A static KV cache for guided decoding, and the one attention function models call.

The cache is preallocated for the whole sequence (gpt-fast style): writing a step is
an index copy, never a `torch.cat`. K and V are stored *unscaled*; SoftCFG's current
multipliers live beside them as one [rows, max_len] tensor (ones for rows and
positions that are not scaled) and are applied on the fly, so they can never
compound across steps.

For the default target "v", with a single query per step
    sum_i p_i (m_i v_i) = sum_i (p_i m_i) v_i,
so the multipliers scale the attention probabilities instead of V: [rows, heads, L]
work instead of [rows, heads, L, head_dim], and no copy of the cache. Target "k"
scales the scores (q . m_i k_i = m_i (q . k_i)) before the softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class StaticKVCache:
    """Preallocated keys/values of every layer for a batch of `batch_size` rows.

    `pos` is the number of positions already written. A model forward over T new
    positions calls `attend(layer, q, k, v)` once per layer (all with the same
    `pos`), then the driver calls `advance(T)`.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int,
                 head_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        # Per-sequence values a model computes in prefill() and reuses in decode()
        # (e.g. RAR's class embedding for adaLN). Models own the keys.
        self.state: dict = {}
        self.scale = 1.0 / math.sqrt(head_dim)
        # SoftCFG state: multipliers per (row, position); None means "all ones".
        self.weights: torch.Tensor | None = None
        self.scale_k = False
        self.scale_v = False

    def enable_multipliers(self, target: str = "v") -> None:
        """Allocate the (all ones) multiplier table; `target` is "v", "k" or "kv"."""
        rows = self.k.shape[1]
        self.weights = torch.ones(rows, self.max_len, device=self.k.device, dtype=torch.float32)
        self.scale_k = "k" in target
        self.scale_v = "v" in target

    def set_multipliers(self, rows: torch.Tensor | slice, start: int, values: torch.Tensor) -> None:
        """Write the multipliers of positions [start, start + values.shape[1]) for `rows`."""
        self.weights[rows, start:start + values.shape[1]] = values

    def advance(self, num_positions: int) -> None:
        self.pos += num_positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v at the current positions and attend causally over the cache.

        q, k, v: [rows, heads, T, head_dim] for the T new positions. Returns
        [rows, heads, T, head_dim].
        """
        start, T = self.pos, q.shape[2]
        end = start + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: writing position {end - 1} into a cache of "
                               f"{self.max_len} positions")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if T == 1 and self.weights is not None:
            return self._attend_weighted(q, keys, values, self.weights[:, None, None, :end])
        mask = None
        if T > 1:  # a chunk attends to everything before it and causally within itself
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _attend_weighted(self, q, keys, values, weights):
        scores = (q @ keys.transpose(-1, -2)) * self.scale
        if self.scale_k:
            scores = scores * weights
        probs = scores.float().softmax(dim=-1)
        if self.scale_v:
            probs = probs * weights
        return probs.to(values.dtype) @ values


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: StaticKVCache | None,
                     layer: int, dropout_p: float = 0.0) -> torch.Tensor:
    """The attention every model layer calls: through the cache when decoding, else a
    plain causal pass over the whole sequence (training, teacher forcing)."""
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return cache.attend(layer, q, k, v)
