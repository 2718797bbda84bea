"""softcfg_patch.cache: the static KV cache's attention against explicit scaling, causal
prefill chunks, overflow."""
from __future__ import annotations

import math

import pytest
import torch

import softcfg_patch as sp


def _random_cache(target: str, rows=4, heads=3, length=9, dim=8):
    torch.manual_seed(1)
    cache = sp.StaticKVCache(1, rows, heads, length + 1, dim)
    k, v = torch.randn(rows, heads, length, dim), torch.randn(rows, heads, length, dim)
    cache.attend(0, torch.randn(rows, heads, length, dim), k, v)
    cache.advance(length)
    cache.enable_multipliers(target)
    w = torch.rand(rows // 2, length + 1) + 0.1
    cache.multipliers.write(slice(rows // 2, rows), 0, w)
    return cache, k, v, w


@pytest.mark.parametrize("target", ["v", "k", "kv"])
def test_cache_attention_equals_explicit_scaling(target):
    cache, k, v, w = _random_cache(target)
    rows, heads, length, dim = k.shape
    q, k1, v1 = (torch.randn(rows, heads, 1, dim) for _ in range(3))
    out = cache.attend(0, q, k1, v1)
    keys, values = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    full = torch.ones(rows, length + 1)
    full[rows // 2:] = w
    scale = full[:, None, :, None]
    ks = keys * scale if "k" in target else keys
    vs = values * scale if "v" in target else values
    expected = torch.softmax(q @ ks.transpose(-1, -2) / math.sqrt(dim), -1) @ vs
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.stack(cache.layer_values)[0, :, :, :length], v)  # stored values stay unscaled


def test_cache_prefill_chunk_is_causal():
    torch.manual_seed(2)
    cache = sp.StaticKVCache(1, 2, 2, 8, 4)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    out = cache.attend(0, q, k, v)
    scores = q @ k.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    cache = sp.StaticKVCache(1, 1, 1, 2, 4)
    cache.advance(2)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.attend(0, *(torch.randn(1, 1, 1, 4) for _ in range(3)))
