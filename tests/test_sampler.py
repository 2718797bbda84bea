"""softcfg_patch.sampler: generate / guided_logits / decode_loop against the authors' released
SoftCFG code (golden vectors) and against direct formulas on the recorded steps."""
from __future__ import annotations

import json

import pytest
import torch

import softcfg_patch as sp
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
    assert torch.equal(torch.stack(soft_cache.layer_values)[0], torch.stack(plain_cache.layer_values)[0]) and torch.equal(torch.stack(soft_cache.layer_keys)[0], torch.stack(plain_cache.layer_keys)[0])
    # Conditional rows of every layer match plain CFG (up to the attention kernel).
    torch.testing.assert_close(torch.stack(soft_cache.layer_values)[:, :2], torch.stack(plain_cache.layer_values)[:, :2], atol=2e-5, rtol=0)


# ------------------------------------------------------------------ bad input


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
