"""The fixed-shape decode step (softcfg_patch.decode_step with a tensor step) and
generate(compile=...): same tokens as the eager sampler and the golden runs.

Compiled runs use the "aot_eager" backend (dynamo capture with fullgraph=True, so no
graph break and no host sync can hide in the step) except one inductor test.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import softcfg_patch as sp
from softcfg_patch.sampler import _WORKSPACES, decode_loop
from conftest import FIXTURES, load_golden

SOFTCFG = load_golden("softcfg/softcfg_tiny_generate.safetensors")
SETTINGS = json.loads((FIXTURES / "softcfg" / "softcfg_tiny_settings.json").read_text())["runs"]
ALITOK_CFG = load_golden("alitok_ar_tiny_generate.safetensors")
RAR_GEN = load_golden("rar_tiny_generate.safetensors")
RAR_LABELS = load_golden("rar_tiny_io.safetensors")["labels"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_rar():
    from rar.model import RAR
    model = RAR(OmegaConf.load(FIXTURES / "rar_tiny_config.yaml")).eval()
    model.load_state_dict(load_file(FIXTURES / "rar_tiny_weights.safetensors"), strict=True)
    return model


def released(run: str) -> sp.Guidance:
    keys = ("guidance_scale", "guidance_scale_pow", "randomize_temperature", "softcfg_strength", "step_norm")
    return sp.Guidance(**{k: SETTINGS[run][k] for k in keys})


def golden_cases():
    """(model fixture, labels, guidance, seed, expected tokens) of every golden sampling run."""
    cases = [("tiny_alitok", SOFTCFG["labels"], released(r), SETTINGS[r]["seed"], SOFTCFG[f"{r}_tokens"], f"softcfg-{r}")
             for r in "abcd"]
    labels = load_golden("alitok_ar_tiny_io.safetensors")["labels"]
    cases += [("tiny_alitok", labels, sp.Guidance(guidance_scale=3.0, guidance_scale_pow=1.0), 42,
               ALITOK_CFG["run1_tokens"], "alitok-cfg-run1"),
              ("tiny_alitok", labels, sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5,
                                                  randomize_temperature=0.9), 7,
               ALITOK_CFG["run2_tokens"], "alitok-cfg-run2"),
              ("tiny_rar", RAR_LABELS, sp.Guidance(guidance_scale=3.0, guidance_scale_pow=1.0), 42,
               RAR_GEN["run1_tokens"], "rar-run1"),
              ("tiny_rar", RAR_LABELS, sp.Guidance(guidance_scale=6.5, guidance_scale_pow=1.01,
                                                   randomize_temperature=1.02), 7,
               RAR_GEN["run2_tokens"], "rar-run2")]
    return [pytest.param(*c[:5], id=c[5]) for c in cases]


@pytest.mark.e2e
@pytest.mark.parametrize("model_name,labels,guidance,seed,expected", golden_cases())
def test_fixed_shape_eager_and_compiled_steps_give_the_golden_tokens(request, model_name, labels,
                                                                     guidance, seed, expected):
    model = request.getfixturevalue(model_name)
    fixed = decode_loop(model, labels, guidance, generator=torch.Generator().manual_seed(seed),
                        fixed_shape=True)[0]
    assert torch.equal(fixed, expected)
    compiled = sp.generate(model, labels, guidance, generator=torch.Generator().manual_seed(seed),
                           compile="aot_eager")
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("model_name,labels", [("tiny_alitok", SOFTCFG["labels"]), ("tiny_rar", RAR_LABELS)])
@pytest.mark.parametrize("extra", [dict(softcfg_strength=1.0, softcfg_align="token", softcfg_target="kv"),
                                   dict(softcfg_strength=0.5, step_norm=False, top_k=7, top_p=0.9,
                                        cfg_interval=100.0),
                                   dict(guidance_scale=0.0, top_p=0.8)])
@pytest.mark.e2e
def test_compiled_step_equals_eager_for_every_option(request, model_name, labels, extra):
    """Options with no golden run (paper-text variants, filters, cfg_interval, no CFG):
    the compiled fixed-shape step reproduces the eager sliced sampler's tokens."""
    model = request.getfixturevalue(model_name)
    g = sp.Guidance(**{"guidance_scale": 4.0, **extra})
    eager = sp.generate(model, labels, g, generator=torch.Generator().manual_seed(3))
    compiled = sp.generate(model, labels, g, generator=torch.Generator().manual_seed(3), compile="aot_eager")
    assert torch.equal(eager, compiled)


@pytest.mark.e2e
def test_workspace_is_reused_and_reset(tiny_alitok):
    labels, g = SOFTCFG["labels"], released("b")
    first = sp.generate(tiny_alitok, labels, g, generator=torch.Generator().manual_seed(1), compile="aot_eager")
    cache = next(iter(_WORKSPACES[tiny_alitok].values()))[0]
    second = sp.generate(tiny_alitok, labels, g, generator=torch.Generator().manual_seed(1), compile="aot_eager")
    assert torch.equal(first, second)  # nothing of the first batch leaks into the second
    assert any(c[0] is cache for c in _WORKSPACES[tiny_alitok].values())  # same buffers, same graph


@pytest.mark.parametrize("target", ["v", "k", "kv"])
def test_fixed_shape_attention_equals_sliced(target):
    torch.manual_seed(4)
    rows, heads, length, dim, max_len = 4, 2, 5, 8, 9
    caches = [sp.StaticKVCache(1, rows, heads, max_len, dim) for _ in range(2)]
    prefix = [torch.randn(rows, heads, length, dim) for _ in range(3)]
    weights = torch.rand(rows, max_len) + 0.1
    for cache in caches:
        cache.attend(0, *prefix)
        cache.advance(length)
        cache.enable_multipliers(target).write(slice(None), 0, weights)
    caches[1].use_fixed_shape()
    for step in range(max_len - length):
        q, k, v = (torch.randn(rows, heads, 1, dim) for _ in range(3))
        sliced = caches[0].attend(0, q, k, v)
        caches[0].advance(1)
        caches[1].position.fill_(length + step)
        fixed = caches[1].attend(0, q, k, v)
        torch.testing.assert_close(fixed, sliced, atol=1e-6, rtol=1e-6)
    for a, b in zip(caches[0].layer_keys + caches[0].layer_values, caches[1].layer_keys + caches[1].layer_values):
        assert torch.equal(a, b)
    # and against the formula written out: weights on the first `end` positions only
    end = max_len
    keys, values = torch.stack(caches[0].layer_keys)[0], torch.stack(caches[0].layer_values)[0]
    w = weights[:, None, None, :end]
    scores = q @ (keys * w.transpose(-1, -2) if "k" in target else keys).transpose(-1, -2) / math.sqrt(dim)
    expected = scores.softmax(-1) @ (values * w.transpose(-1, -2) if "v" in target else values)
    torch.testing.assert_close(fixed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.e2e
def test_bf16_keeps_cache_bf16_and_multipliers_float32(tiny_alitok):
    labels, g = SOFTCFG["labels"], released("a")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = sp.generate(tiny_alitok, labels, g, generator=torch.Generator().manual_seed(0),
                             compile="aot_eager")
    cache, state = next(c for k, c in _WORKSPACES[tiny_alitok].items() if k[-1] == torch.bfloat16)[:2]
    assert all(t.dtype == torch.bfloat16 for t in cache.layer_keys + cache.layer_values)
    assert cache.multipliers.values.dtype == state.history.dtype == torch.float32
    assert (cache.multipliers.values[2:, 1:] < 1).any()  # SoftCFG acted in bf16 too
    assert tokens.shape == (2, 273) and 0 <= tokens.min() and tokens.max() < tiny_alitok.vocab_size


@pytest.mark.e2e
def test_inductor_compiles_once_and_matches_the_golden_tokens(tiny_alitok):
    """The one inductor test (~25 s on 2 cores): compiled once per model and shape, then reused."""
    from torch._dynamo.utils import counters

    labels, g = SOFTCFG["labels"], released("a")
    tokens = sp.generate(tiny_alitok, labels, g, generator=torch.Generator().manual_seed(SETTINGS["a"]["seed"]),
                         compile=True)
    assert torch.equal(tokens, SOFTCFG["a_tokens"])
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = sp.generate(tiny_alitok, labels, g, generator=torch.Generator().manual_seed(SETTINGS["a"]["seed"]),
                            compile=True)
    assert counters["stats"]["unique_graphs"] == graphs and torch.equal(again, tokens)
