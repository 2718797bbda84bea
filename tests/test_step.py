"""The guided step's stages (softcfg_patch.step) against upstream LlamaGen's golden runs
and independent computations: mix, temperature, top-k/top-p, cfg_interval, sampling,
confidence, fixed-shape multipliers, and the per-model rules (unguided_at, rng_preamble)."""
from __future__ import annotations

import json

import pytest
import torch

import softcfg_patch as sp
from softcfg_patch import step as st
from softcfg_patch.guidance import method, runs_cfg, runs_softcfg
from softcfg_patch.rule import aligned_multipliers
from conftest import FIXTURES, load_golden

LLAMAGEN = load_golden("llamagen/llamagen_tiny_golden.safetensors")
RUNS = {r["name"]: r for r in json.loads((FIXTURES / "llamagen" / "llamagen_tiny.json").read_text())["runs"]}


class LlamaGenRule:
    """Only the per-model rule of LlamaGen: any scale <= 1 is unguided (upstream tests > 1)."""
    unguided_at = "<=1"


def llamagen_guidance(run: dict) -> sp.Guidance:
    soft = run.get("softcfg", {})
    return sp.Guidance(guidance_scale=run["cfg_scale"], guidance_scale_pow=0.0,
                       randomize_temperature=run["temperature"], top_k=run["top_k"],
                       top_p=run["top_p"], cfg_interval=run["cfg_interval"],
                       softcfg_strength=soft.get("strength", 0.0), step_norm=soft.get("step_norm", True))


@pytest.mark.parametrize("name", ["run1", "run2", "run3", "run4", "run5"])
def test_stages_replay_upstream_llamagen_sampling(name):
    """Upstream's raw step logits through mix -> T -> top-k -> top-p -> sample give its tokens,
    with the global RNG seeded as upstream did (one multinomial per step, nothing before)."""
    run, g = RUNS[name], llamagen_guidance(RUNS[name])
    logits, want = LLAMAGEN[f"{name}.step_logits"], LLAMAGEN[f"{name}.tokens"]
    B, N = want.shape
    cfg = runs_cfg(g, LlamaGenRule())
    assert cfg == (run["cfg_scale"] > 1) and logits.shape[0] == (2 * B if cfg else B)
    schedule = st.Schedule(g, N)
    history = torch.zeros(B, N)
    torch.manual_seed(run["seed"])
    for t in range(N):
        cond, uncond = logits[:B, t], (logits[B:, t] if cfg else None)
        token = st.sample(st.guide(cond, uncond, t, schedule, g))
        assert torch.equal(token, want[:, t]), f"{name} step {t}"
        st.record_confidence(history, t, cond, want[:, t], g)
    if f"{name}.confidence" in LLAMAGEN:  # SoftCFG: probability under the unfiltered softmax(cond / T)
        torch.testing.assert_close(history, LLAMAGEN[f"{name}.confidence"], atol=1e-6, rtol=0)


def test_cfg_interval_switches_to_conditional_logits_after_the_interval():
    g = sp.Guidance(guidance_scale=2.0, guidance_scale_pow=0.0, cfg_interval=6)
    schedule = st.Schedule(g, 16)
    cond, uncond = torch.randn(2, 8), torch.randn(2, 8)
    for t in range(16):
        out = st.mix(cond, uncond, t, schedule)
        if t - 1 > 6:  # the step predicting x_t (t >= 1) uses cond alone once t - 1 > interval
            assert torch.equal(out, cond)
        else:
            torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond))
        # the fixed-shape form (0-d tensor step) is the same, bit for bit
        assert torch.equal(st.mix(cond, uncond, torch.tensor(t), schedule), out)


def reference_filter(row: list, top_k: int, top_p: float) -> set:
    """Indices kept, computed with plain Python lists (an independent reading of the rule)."""
    kept = set(range(len(row)))
    if top_k > 0:
        kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
        kept = {i for i in kept if row[i] >= kth}
    if top_p < 1.0:
        order = sorted(kept, key=lambda i: -row[i])
        weights = torch.softmax(torch.tensor([row[i] for i in order]), 0).tolist()
        before, out = 0.0, set()
        for i, w in zip(order, weights):
            if before <= top_p:
                out.add(i)
            before += w
        kept = out
    return kept


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.8), (100, 0.3), (1, 0.9)])
def test_filter_keeps_what_the_rule_says(top_k, top_p):
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(top_k))
    out = st.filter_logits(logits, top_k, top_p)
    for row in range(4):
        kept = set(torch.isfinite(out[row]).nonzero()[:, 0].tolist())
        assert kept == reference_filter(logits[row].tolist(), top_k, top_p)
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])  # kept values untouched


def test_top_p_keeps_the_first_token_past_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(st.filter_logits(logits, 0, 0.6))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.6: 0.3 kept; 0.8 > 0.6: rest out
    assert torch.isfinite(st.filter_logits(logits, 0, 0.1)).sum() == 1  # the top token always stays


@pytest.mark.parametrize("align", ["source", "token"])
@pytest.mark.parametrize("step_norm,strength", [(True, 1.0), (True, 0.5), (False, 1.0), (False, 2.0)])
def test_fixed_shape_weights_equal_the_sliced_rule(align, step_norm, strength):
    g = sp.Guidance(softcfg_strength=strength, step_norm=step_norm, softcfg_align=align)
    N = 12
    history = torch.rand(3, N, generator=torch.Generator().manual_seed(3)) * 0.9
    for t in range(1, N):
        known = history.clone()
        known[:, t:] = 0  # what the sampler's buffer holds at step t
        fixed = st.next_multipliers_at(known, torch.tensor(t), g)
        sliced = aligned_multipliers(history[:, :t], strength, step_norm, 0.05, align)
        assert fixed.shape == (3, N - 1)
        torch.testing.assert_close(fixed[:, :t], sliced, atol=1e-6, rtol=0)
        assert torch.equal(fixed[:, t:], torch.ones(3, N - 1 - t))


def test_per_model_rules_default_and_override():
    g0, g1 = sp.Guidance(guidance_scale=0.0), sp.Guidance(guidance_scale=1.0, softcfg_strength=1.0)
    plain = object()
    assert not runs_cfg(g0, plain) and runs_cfg(g1, plain) and runs_softcfg(g1, plain) and runs_cfg(g1)
    assert not runs_cfg(g1, LlamaGenRule()) and not runs_softcfg(g1, LlamaGenRule())
    assert [method(g, LlamaGenRule()) for g in (g0, g1, sp.Guidance(guidance_scale=1.5))] == [
        "noguidance", "noguidance", "cfg"]
    with pytest.raises(ValueError, match="unguided_at is 'never'"):
        runs_cfg(g1, type("Odd", (), {"unguided_at": "never"})())
    state = torch.get_rng_state()
    st.rng_preamble(plain, 3, None, torch.device("cpu"))  # no preamble: draws nothing
    assert torch.equal(torch.get_rng_state(), state)


def test_alitok_preamble_draws_its_uniforms(tiny_alitok):
    torch.manual_seed(5)
    st.rng_preamble(tiny_alitok, 3, None, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(5)
    torch.rand(3)
    assert torch.equal(after, torch.rand(1))
