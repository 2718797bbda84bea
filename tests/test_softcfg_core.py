"""The SoftCFG core against the authors' released code (golden vectors) and against
independent computations: guidance schedule, multipliers, cache attention, sampler."""
from __future__ import annotations

import json
import math

import pytest
import torch

import softcfg_patch as sp
from softcfg_patch.rule import STEP_NORM_EPS, image_position_weights, multipliers, token_confidence
from conftest import FIXTURES, load_golden

SOFTCFG = load_golden("softcfg/softcfg_tiny_generate.safetensors")
SETTINGS = json.loads((FIXTURES / "softcfg" / "softcfg_tiny_settings.json").read_text())["runs"]
N = 273


def guidance_of(run: dict, **extra) -> sp.Guidance:
    keys = ("guidance_scale", "guidance_scale_pow", "randomize_temperature", "softcfg_strength", "step_norm")
    return sp.Guidance(**{k: run[k] for k in keys}, **extra)


def record(model, labels, guidance, tokens):
    """Teacher-forced decode; per step: cond/uncond logits, guided/T, unconditional weights."""
    rec = {"cond": [], "uncond": [], "guided": [], "weights": []}
    B = labels.shape[0]

    def hook(t, cond, uncond, guided, x, cache):
        rec["cond"].append(cond.clone())
        rec["uncond"].append(uncond.clone())
        rec["guided"].append(guided.clone())
        w = cache.multipliers.values[B:].clone() if cache.multipliers is not None else None
        rec["weights"].append(w)
    _, conf = sp.decode_loop(model, labels, guidance, forced_tokens=tokens, on_step=hook)
    out = {k: torch.stack(v, 1) for k, v in rec.items() if k != "weights"}
    out["weights"], out["confidence"] = rec["weights"], conf
    return out


# ---------------------------------------------------------------- schedule
def test_schedule_matches_golden_float32():
    golden = SOFTCFG["cfg_scale"]
    ours = torch.cat([sp.guidance_schedule(t, N, 3.0, 1.0) for t in range(N)])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, golden, atol=1e-5, rtol=0)


def test_schedule_power_zero_is_constant_and_matches_closed_form():
    assert torch.all(torch.cat([sp.guidance_schedule(t, 10, 4.0, 0.0) for t in range(10)]) == 4.0)
    t, n, g, k = 7, 20, 9.0, 1.5
    expected = 1 + (g - 1) * (1 - math.cos(math.pi * (t / n) ** k)) / 2
    assert sp.guidance_schedule(t, n, g, k).item() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------- the released code
@pytest.mark.parametrize("run", ["a", "b", "c", "d"])
def test_softcfg_tokens_equal_released_code(tiny_alitok, run):
    s = SETTINGS[run]
    tokens = sp.generate(tiny_alitok, SOFTCFG["labels"], guidance_of(s),
                         generator=torch.Generator().manual_seed(s["seed"]))
    assert torch.equal(tokens, SOFTCFG[f"{run}_tokens"])


@pytest.mark.parametrize("run", ["a", "b", "c", "d"])
def test_softcfg_logits_confidences_multipliers_equal_released_code(tiny_alitok, run):
    s, labels = SETTINGS[run], SOFTCFG["labels"]
    rec = record(tiny_alitok, labels, guidance_of(s), SOFTCFG[f"{run}_tokens"])
    tol = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rec["guided"], SOFTCFG[f"{run}_guided_logits_over_temp"], **tol)
    torch.testing.assert_close(rec["cond"], SOFTCFG[f"{run}_cond_logits"], **tol)
    torch.testing.assert_close(rec["uncond"], SOFTCFG[f"{run}_uncond_logits"], **tol)
    torch.testing.assert_close(rec["confidence"][:, 1:], SOFTCFG[f"{run}_confidence"][:, 1:], atol=1e-5, rtol=0)
    # Golden [b, t, k]: multiplier on slot k during the forward of step t + 1.
    golden = SOFTCFG[f"{run}_kv_mult_after_step"]
    for t in range(N - 1):
        ours = rec["weights"][t + 1][:, :t + 1]
        torch.testing.assert_close(ours, golden[:, t, :t + 1], atol=5e-5, rtol=0)


def test_strength_zero_is_plain_cfg_exactly(tiny_alitok):
    cfg = load_golden("alitok_ar_tiny_generate.safetensors")
    labels = load_golden("alitok_ar_tiny_io.safetensors")["labels"]
    g = sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5, randomize_temperature=0.9,
                    softcfg_strength=0.0, step_norm=True)
    tokens = sp.generate(tiny_alitok, labels, g, generator=torch.Generator().manual_seed(7))
    assert torch.equal(tokens, cfg["run2_tokens"])
    guided = sp.guided_logits(tiny_alitok, labels, cfg["run2_tokens"], g)
    torch.testing.assert_close(guided, cfg["run2_step_guided_logits_over_temp"].transpose(0, 1),
                               atol=5e-4, rtol=0)


def test_global_rng_matches_explicit_generator(tiny_alitok):
    """generator=None uses the global RNG in upstream order (B uniforms, then multinomials)."""
    labels, g = SOFTCFG["labels"], guidance_of(SETTINGS["a"])
    torch.manual_seed(42)
    assert torch.equal(sp.generate(tiny_alitok, labels, g), SOFTCFG["a_tokens"])


def test_guidance_scale_zero_runs_one_unguided_branch(tiny_alitok):
    labels = SOFTCFG["labels"]
    tokens = SOFTCFG["a_tokens"]
    g = sp.Guidance(guidance_scale=0.0, randomize_temperature=1.3, softcfg_strength=1.0)
    guided = sp.guided_logits(tiny_alitok, labels, tokens, g)
    with torch.no_grad():
        full = tiny_alitok(tokens, tiny_alitok.condition_ids(labels))[:, :N]
    torch.testing.assert_close(guided, full / 1.3, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------- the rule
def test_step_norm_removes_alpha_worth_before_the_floor():
    torch.manual_seed(0)
    conf = torch.rand(3, 200) * 0.3 + 0.01
    for alpha in (1.0, 0.5, 2.0):
        m = multipliers(conf, alpha, step_norm=True, min_weight=0.0)
        share = conf / (conf.sum(-1, keepdim=True) + STEP_NORM_EPS)
        if alpha == 1.0:  # exactly one token's worth: sum(1 - m) = sum(share) ~= 1
            torch.testing.assert_close((1 - m).sum(-1), torch.ones(3), atol=1e-4, rtol=0)
        # independent first-order check: 1 - (1 - s)^a ~= a s for small shares
        torch.testing.assert_close((1 - m).sum(-1), (alpha * share).sum(-1), atol=0.02, rtol=0.02)


def test_step_norm_floor_and_single_position():
    conf = torch.tensor([[0.7]])
    assert multipliers(conf, 1.0, True, 0.05).item() == pytest.approx(0.05)
    two = multipliers(torch.tensor([[0.3, 0.1]]), 1.0, True, 0.05)
    torch.testing.assert_close(two, torch.tensor([[1 - 0.3 / (0.4 + 1e-5), 1 - 0.1 / (0.4 + 1e-5)]]))


def test_step_norm_off_and_strength_zero():
    conf = torch.tensor([[0.2, 0.9]])
    torch.testing.assert_close(multipliers(conf, 1.0, False), torch.tensor([[0.8, 0.1]]))
    torch.testing.assert_close(multipliers(conf, 2.0, False), torch.tensor([[0.64, 0.01]]))
    assert torch.equal(multipliers(conf, 0.0, True), torch.ones(1, 2))


def test_alignment_source_and_token():
    hist = torch.tensor([[0.9, 0.2, 0.4, 0.6]])  # c_0 .. c_3, step t = 4
    src = image_position_weights(hist, 1.0, False, align="source")
    # positions of x_0..x_2 get c_1..c_3, x_3 (appended this step) gets 1
    torch.testing.assert_close(src, torch.tensor([[0.8, 0.6, 0.4, 1.0]]))
    tok = image_position_weights(hist, 1.0, False, align="token")
    torch.testing.assert_close(tok, torch.tensor([[0.1, 0.8, 0.6, 0.4]]))


def test_confidence_sampled_and_max():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(logits / 0.5, -1)
    assert token_confidence(logits, torch.tensor([1]), 0.5, "sampled").item() == pytest.approx(p[0, 1].item())
    assert token_confidence(logits, torch.tensor([1]), 0.5, "max").item() == pytest.approx(p[0, 0].item())


@pytest.mark.parametrize("align,kind", [("token", "sampled"), ("source", "max"), ("token", "max")])
def test_paper_text_variants_follow_the_direct_formula(tiny_alitok, align, kind):
    """Weights in the cache at every step equal the direct formula on the recorded confidences
    (never compounded), and the recorded confidences equal softmax(cond / T)."""
    labels, tokens = SOFTCFG["labels"], SOFTCFG["a_tokens"]
    g = sp.Guidance(guidance_scale=3.0, softcfg_strength=1.0, randomize_temperature=1.2,
                    softcfg_align=align, softcfg_confidence=kind)
    rec = record(tiny_alitok, labels, g, tokens)
    probs = torch.softmax(rec["cond"] / 1.2, -1)
    expect_conf = probs.gather(-1, tokens[..., None])[..., 0] if kind == "sampled" else probs.amax(-1)
    torch.testing.assert_close(rec["confidence"], expect_conf, atol=1e-6, rtol=0)
    conf = rec["confidence"]
    for t in (1, 2, 50, 272):
        scaled = conf[:, 1:t] if align == "source" else conf[:, :t]
        share = scaled / (scaled.sum(-1, keepdim=True) + 1e-5)
        direct = ((1 - share) ** 1.0).clamp_min(0.05)
        if align == "source":
            direct = torch.cat([direct, torch.ones(2, 1)], 1)
        w = rec["weights"][t]
        assert torch.all(w[:, 0] == 1)  # the class-token position is never scaled
        torch.testing.assert_close(w[:, 1:t + 1], direct, atol=1e-6, rtol=0)


def test_softcfg_leaves_conditional_rows_and_stored_cache_untouched(tiny_alitok):
    labels, tokens = SOFTCFG["labels"], SOFTCFG["a_tokens"]
    g_soft = sp.Guidance(guidance_scale=3.0, softcfg_strength=1.0)
    g_cfg = sp.Guidance(guidance_scale=3.0, softcfg_strength=0.0)
    soft, plain = record(tiny_alitok, labels, g_soft, tokens), record(tiny_alitok, labels, g_cfg, tokens)
    # Same values up to the attention kernel (SDPA for plain CFG, explicit for SoftCFG).
    torch.testing.assert_close(soft["cond"], plain["cond"], atol=2e-5, rtol=0)
    assert not torch.allclose(soft["uncond"], plain["uncond"], atol=1e-3)
    caches = []
    for g in (g_soft, g_cfg):
        sp.decode_loop(tiny_alitok, labels, g, forced_tokens=tokens,
                       on_step=lambda t, *a: caches.append(a[-1]) if t == N - 1 else None)
    soft_cache, plain_cache = caches
    # Layer 0 K/V depend only on the embeddings: stored unscaled, they equal plain CFG's.
    assert torch.equal(soft_cache.v[0], plain_cache.v[0]) and torch.equal(soft_cache.k[0], plain_cache.k[0])
    # Conditional rows of every layer match plain CFG (up to the attention kernel).
    torch.testing.assert_close(soft_cache.v[:, :2], plain_cache.v[:, :2], atol=2e-5, rtol=0)


# ------------------------------------------------------------------- the cache
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
    assert torch.equal(cache.v[0, :, :, :length], v)  # stored values stay unscaled


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


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"randomize_temperature": 0.0}, "randomize_temperature"),
    ({"softcfg_strength": float("nan")}, "softcfg_strength"),
    ({"step_norm": "yes"}, "step_norm"),
    ({"softcfg_confidence": "mean"}, "sampled"),
    ({"softcfg_align": "left"}, "source"),
    ({"softcfg_target": "q"}, "'kv'"),
    ({"softcfg_min_weight": 2.0}, "softcfg_min_weight"),
])
def test_guidance_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.Guidance(**kwargs)


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([1000]), r"\[0, 1000\)"),
    (torch.tensor([-1]), r"\[0, 1000\)"),
    (torch.tensor([0.5]), "integer"),
    (torch.tensor([], dtype=torch.long), "empty"),
])
def test_generate_rejects_bad_labels(tiny_alitok, labels, match):
    with pytest.raises(ValueError, match=match):
        sp.generate(tiny_alitok, labels, sp.Guidance())


def test_guided_logits_rejects_wrong_token_shape(tiny_alitok):
    with pytest.raises(ValueError, match=r"\(2, 273\)"):
        sp.guided_logits(tiny_alitok, SOFTCFG["labels"], torch.zeros(2, 10, dtype=torch.long), sp.Guidance())
