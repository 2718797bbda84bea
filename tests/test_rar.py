"""The RAR generator against the upstream golden vectors (bytedance/1d-tokenizer) and
SoftCFG on RAR against an independent from-scratch reference written here."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import softcfg_patch as sp
from softcfg_patch.guidance import method
from conftest import FIXTURES, ROOT, load_golden
from rar.model import RAR

IO = load_golden("rar_tiny_io.safetensors")
GEN = load_golden("rar_tiny_generate.safetensors")
KEYS = json.loads((FIXTURES / "keys_rar.json").read_text())
RUNS = {"run1": dict(seed=42, guidance_scale=3.0, guidance_scale_pow=1.0, randomize_temperature=1.0),
        "run2": dict(seed=7, guidance_scale=6.5, guidance_scale_pow=1.01, randomize_temperature=1.02)}
N, B = 256, 2
LABELS = IO["labels"]


@pytest.fixture(scope="module")
def tiny_rar() -> RAR:
    model = RAR(OmegaConf.load(FIXTURES / "rar_tiny_config.yaml")).eval()
    model.load_state_dict(load_file(FIXTURES / "rar_tiny_weights.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def weights() -> dict:
    return load_file(FIXTURES / "rar_tiny_weights.safetensors")


def guidance(run: str, **softcfg) -> sp.Guidance:
    return sp.Guidance(**{k: v for k, v in RUNS[run].items() if k != "seed"}, **softcfg)


# ------------------------------------------------------------ structure and configs
@pytest.mark.parametrize("size", ["b", "l", "xl", "xxl"])
def test_state_dict_equals_official_keys(size):
    cfg = OmegaConf.load(ROOT / "configs" / f"rar_{size}.yaml")
    with torch.device("meta"):
        model = RAR(cfg)
    expected = KEYS[f"rar_{size}"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in expected["keys"].items()}
    assert len(ours) == expected["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]
    assert model.none_condition_id == expected["none_condition_id"]
    # the architecture keys of our config equal the upstream config the key list came from
    upstream = expected["generator_config"]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "image_seq_len", "condition_num_classes"):
        assert cfg.model.generator[name] == upstream["generator"][name], name
    ours_vq = OmegaConf.to_container(cfg.model.vq_model)
    # the tokenizer file lives under weights/ here; everything else is upstream's
    ours_vq["pretrained_tokenizer_weight"] = ours_vq["pretrained_tokenizer_weight"].removeprefix("weights/")
    assert ours_vq == upstream["vq_model"]


@pytest.mark.parametrize("size,scale,power,temp", [("b", 16.0, 2.75, 1.0), ("l", 15.5, 2.5, 1.02),
                                                   ("xl", 6.9, 1.5, 1.02), ("xxl", 8.0, 1.2, 1.02)])
def test_config_sampling_settings_are_upstream_readme(size, scale, power, temp):
    cfg = OmegaConf.load(ROOT / "configs" / f"rar_{size}.yaml")
    g = sp.Guidance.from_config(cfg.model.generator)
    assert (g.guidance_scale, g.guidance_scale_pow, g.randomize_temperature) == (scale, power, temp)
    assert method(g, RAR) == "cfg"  # shipped configs are plain CFG
    assert cfg.experiment.generator_checkpoint == f"weights/rar_{size}.bin"
    assert cfg.model.generator.seed == 42


def test_tiny_weights_load_strictly_and_ids(tiny_rar):
    assert len(tiny_rar.state_dict()) == 45
    assert tiny_rar.num_prefix_positions == 2
    assert torch.equal(tiny_rar.condition_ids(LABELS), IO["cond_ids"])
    assert torch.equal(tiny_rar.none_condition_ids(LABELS), IO["none_ids"])


# ------------------------------------------------------------- golden numerics
@torch.no_grad()
def test_full_forward_matches_golden(tiny_rar):
    out = tiny_rar(IO["cfg_tokens"], IO["cfg_cond_ids"])
    torch.testing.assert_close(out, IO["logits_full"], atol=1e-4, rtol=1e-4)
    cond_only = tiny_rar(IO["tokens"], IO["cond_ids"])
    torch.testing.assert_close(cond_only, IO["logits_full_cond_only"], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prefix_forward_matches_golden_rows(tiny_rar):
    # a shorter sequence keeps the target-aware term on its last row (it predicts x_L)
    out = tiny_rar(IO["cfg_tokens"][:, :10], IO["cfg_cond_ids"])
    torch.testing.assert_close(out, IO["logits_full"][:, :11], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_intermediates_match_golden(tiny_rar):
    seen = {}
    hooks = [
        tiny_rar.embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("embed_out", out)),
        tiny_rar.blocks[0].register_forward_pre_hook(
            lambda m, a: seen.update(block0_in=a[0], block0_adaln_cond_in=a[1])),
        tiny_rar.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("block0_out", out)),
        tiny_rar.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("block1_out", out)),
        tiny_rar.adaln_before_head.register_forward_hook(
            lambda m, a, out: seen.__setitem__("final_adaln_out", out)),
    ]
    try:
        tiny_rar(IO["tokens"], IO["cond_ids"])
    finally:
        for h in hooks:
            h.remove()
    for name, value in seen.items():
        torch.testing.assert_close(value, IO[f"inter_{name}"], atol=1e-4, rtol=1e-4, msg=name)
    assert len(seen) == 6


def record(model: RAR, labels: torch.Tensor, g: sp.Guidance, tokens: torch.Tensor | None = None,
           seed: int | None = None) -> dict:
    """Run the sampler; per step: cond, uncond, guided/T and the unconditional multipliers."""
    rec = {"cond": [], "uncond": [], "guided": [], "weights": [], "cond_weights": []}
    rows = labels.shape[0]

    def hook(t, cond, uncond, guided, x, cache):
        rec["cond"].append(cond.clone())
        rec["uncond"].append(uncond.clone())
        rec["guided"].append(guided.clone())
        if cache.multipliers is not None:
            rec["weights"].append(cache.multipliers.values[rows:, :t + 2].clone())
            rec["cond_weights"].append(cache.multipliers.values[:rows].clone())
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out_tokens, conf = sp.decode_loop(model, labels, g, generator=generator, forced_tokens=tokens,
                                      on_step=hook)
    out = {k: torch.stack(rec[k], 1) for k in ("cond", "uncond", "guided")}
    out.update(tokens=out_tokens, confidence=conf, weights=rec["weights"], cond_weights=rec["cond_weights"])
    return out


def test_kv_decode_matches_golden(tiny_rar):
    rec = record(tiny_rar, LABELS, sp.Guidance(guidance_scale=3.0), tokens=IO["tokens"])
    kv = torch.cat([rec["cond"], rec["uncond"]])
    torch.testing.assert_close(kv, IO["logits_kv"], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_interleaved_caches_keep_their_own_condition(tiny_rar):
    # decode() reads the condition prefill() saw for *that* cache
    full = tiny_rar(IO["cfg_tokens"][:, :3], IO["cfg_cond_ids"])
    caches = {rows: sp.StaticKVCache(2, 2, 4, 10, 16) for rows in ((0, 1), (2, 3))}
    logits = {rows: [tiny_rar.prefill(IO["cfg_cond_ids"][list(rows)], c)] for rows, c in caches.items()}
    for c in caches.values():
        c.advance(2)
    for step in (1, 2, 3):
        for rows, c in caches.items():
            logits[rows].append(tiny_rar.decode(IO["cfg_tokens"][list(rows), step - 1], step, c))
            c.advance(1)
    ours = torch.cat([torch.stack(logits[r], 1) for r in caches])
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("run", ["run1", "run2"])
def test_generate_reproduces_golden(tiny_rar, run):
    rec = record(tiny_rar, LABELS, guidance(run), seed=RUNS[run]["seed"])
    assert torch.equal(rec["tokens"], GEN[f"{run}_tokens"])
    torch.testing.assert_close(rec["guided"].transpose(0, 1), GEN[f"{run}_step_guided_logits_over_temp"],
                               atol=5e-4, rtol=0)
    raw = torch.cat([rec["cond"], rec["uncond"]]).transpose(0, 1)
    torch.testing.assert_close(raw, GEN[f"{run}_step_logits_cond_uncond"], atol=1e-4, rtol=1e-4)


def test_guided_logits_teacher_forced_matches_golden(tiny_rar):
    guided = sp.guided_logits(tiny_rar, LABELS, GEN["run2_tokens"], guidance("run2"))
    torch.testing.assert_close(guided.transpose(0, 1), GEN["run2_step_guided_logits_over_temp"],
                               atol=5e-4, rtol=0)


@pytest.mark.parametrize("extra", [dict(step_norm=True), dict(step_norm=False, softcfg_align="token")])
def test_softcfg_strength_zero_is_plain_cfg(tiny_rar, extra):
    g = guidance("run1", softcfg_strength=0.0, **extra)
    tokens = sp.generate(tiny_rar, LABELS, g, generator=torch.Generator().manual_seed(42))
    assert torch.equal(tokens, GEN["run1_tokens"])


# ------------------------------------------- independent slow reference for SoftCFG
def _layer_norm(x, weight=None, bias=None, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def _linear(W, name, x):
    return x @ W[f"{name}.weight"].T + W[f"{name}.bias"]


def reference_logits(W: dict, condition_ids: torch.Tensor, tokens: torch.Tensor,
                     mult: torch.Tensor | None = None, target: str = "v", heads: int = 4) -> torch.Tensor:
    """RAR from the weight dict, no cache, explicit attention; logits [R, L + 1, V].

    mult [R, S, S]: multiplier of key k for query q (target "v": on the attention
    probabilities, i.e. on v_k; "k": on the scores). Layers = 2 (the tiny model).
    """
    emb = W["embeddings.weight"][torch.cat([condition_ids[:, None], tokens], 1)]
    R, S = emb.shape[0], emb.shape[1] + 1
    x = torch.cat([W["cls_token"].expand(R, 1, -1), emb], 1)
    j = torch.arange(S)
    x = x + W["pos_embed"][0, :S]
    x = x + W["target_aware_pos_embed"][0, j + 1] * ((j >= 1) & (j <= N)).float()[:, None]
    c = emb[:, :1] + W["timesteps_embeddings"][0, :S]
    D = x.shape[-1]
    hd = D // heads
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for layer in range(2):
        p = f"blocks.{layer}."
        mods = _linear(W, p + "adaLN_modulation.1", torch.nn.functional.silu(c)).chunk(6, -1)
        h = _layer_norm(x, W[p + "norm1.weight"], W[p + "norm1.bias"]) * (1 + mods[1]) + mods[0]
        q, k, v = _linear(W, p + "attn.qkv", h).view(R, S, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q = _layer_norm(q, W[p + "attn.q_norm.weight"], W[p + "attn.q_norm.bias"])
        k = _layer_norm(k, W[p + "attn.k_norm.weight"], W[p + "attn.k_norm.bias"])
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if mult is not None and target == "k":
            scores = scores * mult[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        if mult is not None and target == "v":
            probs = probs * mult[:, None]
        attn = _linear(W, p + "attn.proj", (probs @ v).transpose(1, 2).reshape(R, S, D))
        x = x + mods[2] * attn
        h = _layer_norm(x, W[p + "norm2.weight"], W[p + "norm2.bias"]) * (1 + mods[4]) + mods[3]
        mlp = _linear(W, p + "mlp.fc2", torch.nn.functional.gelu(_linear(W, p + "mlp.fc1", h)))
        x = x + mods[5] * mlp
    scale, shift = _linear(W, "adaln_before_head.adaLN_modulation.1",
                           torch.nn.functional.silu(c[:, 1:])).chunk(2, -1)
    x = _layer_norm(x[:, 1:]) * (1 + scale) + shift
    return _linear(W, "lm_head", x)


def reference_multipliers(conf: torch.Tensor, alpha: float, step_norm: bool, align: str,
                          floor: float = 0.05) -> torch.Tensor:
    """M [B, S, S] from the direct formula, per query position.

    The query at sequence position q >= 2 is processed at step s = q - 1 (it feeds
    x_{s-1}); its keys are cls, condition (weight 1) and x_0 .. x_{s-1} at 2 + i.
    source: x_i (i <= s - 2) is weighed by c_{i+1}, normalised over c_1 .. c_{s-1},
            and x_{s-1} (the query itself) keeps 1;  token: x_i by c_i over c_0 .. c_{s-1}.
    """
    rows, S = conf.shape[0], N + 2
    M = torch.ones(rows, S, S, dtype=torch.float64)
    conf = conf.double()
    for q in range(2, S):
        s = q - 1
        c = conf[:, 1:s] if align == "source" else conf[:, :s]
        if c.shape[1] == 0:
            continue
        if step_norm:
            m = ((1 - c / (c.sum(-1, keepdim=True) + 1e-5)) ** alpha).clamp_min(floor)
        else:
            m = (1 - c) ** alpha
        M[:, q, 2:2 + c.shape[1]] = m
    return M.float()


def test_reference_forward_matches_golden(weights):
    ref = reference_logits(weights, IO["cfg_cond_ids"], IO["cfg_tokens"])
    torch.testing.assert_close(ref, IO["logits_full"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha,step_norm,align,target", [
    (1.0, True, "source", "v"),
    (1.0, False, "source", "v"),
    (1.0, True, "token", "v"),
    (0.5, True, "source", "k"),
])
def test_softcfg_matches_independent_reference(tiny_rar, weights, alpha, step_norm, align, target):
    g = guidance("run1", softcfg_strength=alpha, step_norm=step_norm, softcfg_align=align,
                 softcfg_target=target)
    rec = record(tiny_rar, LABELS, g, seed=42)
    tokens, T = rec["tokens"], g.randomize_temperature

    cond = reference_logits(weights, IO["cond_ids"], tokens)[:, :N]
    conf = (cond / T).softmax(-1).gather(-1, tokens[..., None])[..., 0]
    M = reference_multipliers(conf, alpha, step_norm, align)
    uncond = reference_logits(weights, IO["none_ids"], tokens, mult=M, target=target)[:, :N]
    t = torch.arange(N, dtype=torch.float64)
    scale = 1 + (g.guidance_scale - 1) * (1 - torch.cos(math.pi * (t / N) ** g.guidance_scale_pow)) / 2
    guided = (uncond + (cond - uncond) * scale[None, :, None].float()) / T

    torch.testing.assert_close(rec["guided"], guided, atol=1e-4, rtol=0)
    torch.testing.assert_close(rec["uncond"], uncond, atol=1e-4, rtol=0)
    torch.testing.assert_close(rec["confidence"], conf, atol=1e-5, rtol=0)
    for step, w in enumerate(rec["weights"]):
        torch.testing.assert_close(w, M[:, step + 1, :step + 2], atol=5e-5, rtol=0)
        assert torch.all(w[:, :2] == 1)  # cls and class positions are never scaled
    assert all(torch.all(w == 1) for w in rec["cond_weights"])  # conditional rows never scaled
    assert M[:, 2:, 2:].min() < 0.5  # the multipliers do act on this run
    # ... and move the unconditional branch away from plain CFG (golden run1, same seed),
    # while step 0 (prefix only, nothing to scale) is untouched
    plain_uncond = GEN["run1_step_logits_cond_uncond"][:, B:].transpose(0, 1)
    torch.testing.assert_close(rec["uncond"][:, 0], plain_uncond[:, 0], atol=1e-4, rtol=1e-4)
    if torch.equal(tokens, GEN["run1_tokens"]):
        assert (rec["uncond"] - plain_uncond).abs().max() > 0.1
