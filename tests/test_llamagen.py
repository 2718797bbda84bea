"""LlamaGen GPT and VQ-16 against the upstream golden data (FoundationVision/LlamaGen,
tests/fixtures/llamagen/README.md), plus independent checks (GQA, step as a tensor)."""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import softcfg_patch as sp
from conftest import FIXTURES, ROOT
from llamagen import GPT, VQModel, load_gpt, load_vq, resize_for_eval
from softcfg_patch.layers import signed_to_uint8_hwc as to_uint8_hwc
from softcfg_patch.checkpoint import CheckpointError
from softcfg_patch.run import registry
from softcfg_patch.guidance import runs_cfg
from softcfg_patch.rule import aligned_multipliers, token_confidence
from softcfg_patch.step import rng_preamble

HERE = FIXTURES / "llamagen"
GOLDEN = load_file(HERE / "llamagen_tiny_golden.safetensors")
SPEC = json.loads((HERE / "llamagen_tiny.json").read_text())
KEYS = json.loads((HERE / "keys_llamagen.json").read_text())["models"]
RUNS = {run["name"]: run for run in SPEC["runs"]}
TINY_CONFIG = ROOT / "tests" / "configs" / "llamagen_tiny.yaml"
TINY_WEIGHTS = HERE / "llamagen_gpt_tiny_weights.safetensors"
# where the file is published: the registry's text, which the runner hands every loader
SOURCE = registry.get("llamagen").source("experiment.generator_checkpoint")
N, P = 16, 1  # image tokens, prefix positions


@pytest.fixture(scope="module")
def tiny() -> GPT:
    model = GPT(OmegaConf.load(TINY_CONFIG)).eval()
    model.load_state_dict(load_file(TINY_WEIGHTS), strict=True)
    return model


def tiny_vq_state() -> dict:
    """The tiny VQ weights from the golden recipe (llamagen_tiny.json), checked by SHA-256."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VQModel(**SPEC["vq_config"]).state_dict().items()}
    g = torch.Generator().manual_seed(SPEC["weight_seed"] + 1)
    state, digest = {}, hashlib.sha256()
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("codebook_used"):
            state[key] = torch.zeros(shape)
        elif len(shape) == 1 and "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64).float()
        elif len(shape) == 1:
            state[key] = (0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
        else:
            fan = shape[1:].numel()
            state[key] = ((1 / fan) ** 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
        digest.update(state[key].numpy().tobytes())
    assert digest.hexdigest() == SPEC["vq_weights_sha256"], "tiny VQ recipe no longer reproduces the golden weights"
    return state


@pytest.fixture(scope="module")
def tiny_vq() -> VQModel:
    with torch.device("meta"):
        model = VQModel(**SPEC["vq_config"])
    model.load_state_dict(tiny_vq_state(), strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------ structure and configs
SIZES = [("b", "B", 384), ("l", "L", 384), ("xl", "XL", 384), ("xxl", "XXL", 384), ("3b", "3B", 384),
         ("b_256", "B", 256), ("l_256", "L", 256)]
UPSTREAM_CFG = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}


@pytest.mark.parametrize("config,size,res", SIZES)
def test_state_dict_keys_and_shapes_equal_upstream(config, size, res):
    cfg = OmegaConf.load(ROOT / "configs" / f"llamagen_{config}.yaml")
    with torch.device("meta"):
        model = GPT(cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == KEYS[f"GPT-{size}@{res}"]
    assert model.num_image_tokens == (res // 16) ** 2


@pytest.mark.parametrize("config,size,res", SIZES)
def test_configs_carry_upstream_sampling_defaults(config, size, res):
    cfg = OmegaConf.load(ROOT / "configs" / f"llamagen_{config}.yaml")
    gen = cfg.model.generator
    assert (gen.guidance_scale, gen.guidance_scale_pow, gen.randomize_temperature) == (UPSTREAM_CFG[size], 0.0, 1.0)
    assert (gen.top_k, gen.top_p, gen.cfg_interval, gen.softcfg_strength) == (0, 1.0, -1, 0.0)
    assert cfg.experiment.generator_checkpoint.endswith(f"c2i_{size}_{res}.pt")
    assert cfg.experiment.tokenizer_checkpoint.endswith("vq_ds16_c2i.pt")
    sp.Guidance.from_config(gen)  # every Guidance field in the config is valid


def test_vq16_keys_equal_upstream():
    config = OmegaConf.load(ROOT / "configs" / "llamagen_xl.yaml").model.vq_model
    with torch.device("meta"):
        default, from_config = VQModel(), VQModel(**config)
    for model in (default, from_config):
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == KEYS["VQ-16"]
    tiny = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.vq_model)
    assert tiny == SPEC["vq_config"]


def test_protocol_constants_and_hooks(tiny):
    assert (tiny.num_image_tokens, tiny.vocab_size, tiny.num_classes, tiny.num_prefix_positions) == (16, 64, 10, 1)
    assert (tiny.num_layers, tiny.num_heads, tiny.head_dim) == (2, 4, 16)
    labels = torch.tensor([3, 7])
    assert torch.equal(tiny.condition_ids(labels), labels)
    assert torch.equal(tiny.none_condition_ids(labels), torch.tensor([10, 10]))
    on = lambda scale: runs_cfg(sp.Guidance(guidance_scale=scale), tiny)  # noqa: E731
    assert not on(1.0) and not on(0.5) and on(1.01)
    state = torch.get_rng_state()
    rng_preamble(tiny, 2, None, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # draws nothing


# ------------------------------------------------------------ logits
def test_teacher_forced_full_pass_equals_golden(tiny):
    with torch.no_grad():
        logits = tiny(GOLDEN["run1.tokens"], torch.tensor(RUNS["run1"]["labels"]))
    torch.testing.assert_close(logits[:, :N], GOLDEN["teacher.cond_logits"], atol=1e-4, rtol=1e-4)


def forced_step_logits(model: GPT, run: dict, tokens: torch.Tensor, confidence: torch.Tensor | None,
                       step_as_tensor: bool = False) -> torch.Tensor:
    """Feed the golden tokens through prefill + decode on the [cond; uncond] batch, setting the
    SoftCFG multipliers of the unconditional rows from the golden confidences each step."""
    labels = torch.tensor(run["labels"])
    B = len(labels)
    cfg = run["cfg_scale"] > 1
    conditions = torch.cat([labels, model.none_condition_ids(labels)]) if cfg else labels
    cache = sp.StaticKVCache(model.num_layers, len(conditions), model.num_heads, P + N - 1, model.head_dim)
    soft = run.get("softcfg")
    if soft:
        cache.enable_multipliers("v")
    steps = [model.prefill(conditions, cache)]
    cache.advance(P)
    for t in range(1, N):
        if soft:
            cache.multipliers.write(slice(B, 2 * B), P, aligned_multipliers(
                confidence[:, :t], soft["strength"], soft["step_norm"], 0.05, "source"))
        previous = torch.cat([tokens[:, t - 1]] * (2 if cfg else 1))
        steps.append(model.decode(previous, torch.tensor(t) if step_as_tensor else t, cache))
        cache.advance(1)
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_cached_decode_equals_golden_step_logits(tiny, run):
    spec, tokens = RUNS[run], GOLDEN[f"{run}.tokens"]
    confidence = GOLDEN.get(f"{run}.confidence")
    with torch.no_grad():
        logits = forced_step_logits(tiny, spec, tokens, confidence)
    torch.testing.assert_close(logits, GOLDEN[f"{run}.step_logits"], atol=1e-4, rtol=1e-4)
    if confidence is not None:  # our confidences (sampler rule) from our logits equal upstream's
        B = tokens.shape[0]
        ours = torch.stack([token_confidence(logits[:B, t], tokens[:, t], spec["temperature"]) for t in range(N)], 1)
        torch.testing.assert_close(ours, confidence, atol=1e-5, rtol=1e-4)


def test_decode_step_may_be_a_tensor(tiny):
    spec, tokens, confidence = RUNS["run4"], GOLDEN["run4.tokens"], GOLDEN["run4.confidence"]
    with torch.no_grad():
        as_int = forced_step_logits(tiny, spec, tokens, confidence)
        as_tensor = forced_step_logits(tiny, spec, tokens, confidence, step_as_tensor=True)
    assert torch.equal(as_int, as_tensor)


@pytest.mark.skipif(not hasattr(sp.StaticKVCache, "use_fixed_shape"), reason="needs the fixed-shape cache")
def test_fixed_shape_decode_compiles_once_and_equals_golden(tiny):
    """decode() with a 0-d step tensor traces into one graph (no branch on the step's value)
    and the fixed-shape cache path gives the upstream logits."""
    tokens, labels = GOLDEN["run1.tokens"], torch.tensor(RUNS["run1"]["labels"])
    cache = sp.StaticKVCache(tiny.num_layers, 4, tiny.num_heads, P + N - 1, tiny.head_dim)
    cache.use_fixed_shape()

    def step_fn(previous, step):
        cache.position.copy_(step + (P - 1))
        return tiny.decode(previous, step, cache)

    step_fn = torch.compile(step_fn, backend="eager", fullgraph=True)
    step = torch.zeros((), dtype=torch.long)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        logits = [tiny.prefill(torch.cat([labels, tiny.none_condition_ids(labels)]), cache)]
        cache.advance(P)
        for t in range(1, N):
            step.fill_(t)
            logits.append(step_fn(torch.cat([tokens[:, t - 1]] * 2), step))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.stack(logits, 1), GOLDEN["run1.step_logits"], atol=1e-4, rtol=1e-4)


def test_grouped_query_attention_equals_expanded_heads():
    """n_kv_head < n_head: same outputs as a full-head twin whose K/V weights repeat each
    kv head for its query group (independent of how the model expands heads)."""
    cfg = OmegaConf.load(TINY_CONFIG)
    cfg.model.generator.n_kv_head = 2
    torch.manual_seed(0)
    gqa = GPT(cfg).eval()
    cfg.model.generator.n_kv_head = None
    mha = GPT(cfg).eval()
    state = gqa.state_dict()
    d, hd, group = 64, 16, 2
    for layer in range(2):
        w = state[f"layers.{layer}.attention.wqkv.weight"]
        q, k, v = w.split([d, 2 * hd, 2 * hd])
        expand = lambda m: m.view(2, hd, d).repeat_interleave(group, dim=0).reshape(-1, d)  # noqa: E731
        state[f"layers.{layer}.attention.wqkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state, strict=True)
    assert gqa.layers[0].attention.wqkv.weight.shape == (128, 64)
    tokens, labels = GOLDEN["run1.tokens"], torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens, labels), mha(tokens, labels), atol=1e-5, rtol=1e-5)
        run = dict(RUNS["run4"], labels=[3, 7])
        torch.testing.assert_close(forced_step_logits(gqa, run, tokens, GOLDEN["run4.confidence"]),
                                   forced_step_logits(mha, run, tokens, GOLDEN["run4.confidence"]),
                                   atol=1e-5, rtol=1e-5)
        # the cached decode of the GQA model equals its own full pass (no SoftCFG)
        full = gqa(tokens, labels)[:, :N]
        cached = forced_step_logits(gqa, dict(RUNS["run3"], labels=[3, 7]), tokens, None)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ sampling (core branch API)
@pytest.mark.parametrize("run", sorted(RUNS))
def test_sampling_tokens_equal_golden(tiny, run):
    spec = RUNS[run]
    soft = spec.get("softcfg", {})
    guidance = sp.Guidance(guidance_scale=spec["cfg_scale"], guidance_scale_pow=0,
                           randomize_temperature=spec["temperature"], top_k=spec["top_k"],
                           top_p=spec["top_p"], cfg_interval=spec["cfg_interval"],
                           softcfg_strength=soft.get("strength", 0.0), step_norm=soft.get("step_norm", True))
    torch.manual_seed(spec["seed"])
    tokens = sp.generate(tiny, torch.tensor(spec["labels"]), guidance)
    assert torch.equal(tokens, GOLDEN[f"{run}.tokens"])


@pytest.mark.parametrize("option,value", [("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)])
def test_invalid_sampling_options_are_rejected(option, value):
    with pytest.raises(ValueError, match=option) as err:
        sp.Guidance(**{option: value})
    assert "\n" not in str(err.value)


# ------------------------------------------------------------ VQ
def test_vq_decode_equals_golden(tiny_vq):
    codes = GOLDEN["vq.codes"]
    decoded = tiny_vq.decode_code(codes, [2, 8, 4, 4])
    torch.testing.assert_close(decoded, GOLDEN["vq.decoded"], atol=1e-4, rtol=0)
    assert decoded.min() < -1 and decoded.max() > 1  # not clamped
    torch.testing.assert_close(tiny_vq.decode_code(codes.view(2, 4, 4)), decoded, atol=0, rtol=0)
    diff = (to_uint8_hwc(decoded).int() - GOLDEN["vq.uint8_hwc"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_vq_encode_equals_golden(tiny_vq):
    indices = tiny_vq.encode(GOLDEN["vq.encode_input"])
    assert indices.shape == (2, 16)
    assert torch.equal(indices.flatten(), GOLDEN["vq.encode_indices"])


def test_uint8_conversion_and_eval_resize():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    # 127.5 x + 128, clamped to [0, 255], truncated
    assert to_uint8_hwc(x)[0, 0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]
    assert torch.equal(to_uint8_hwc(GOLDEN["vq.decoded"]), GOLDEN["vq.uint8_hwc"])
    image = torch.randn(2, 3, 384, 384)
    assert torch.equal(resize_for_eval(image[:, :, :256, :256]), image[:, :, :256, :256])
    small = resize_for_eval(image)
    assert small.shape == (2, 3, 256, 256)
    flat = resize_for_eval(torch.full((1, 3, 384, 384), 0.25))
    torch.testing.assert_close(flat, torch.full((1, 3, 256, 256), 0.25))  # bicubic keeps constants
    assert small.std() < 0.9 * image.std()  # white noise is smoothed by the resampling


def test_vq_decode_rejects_bad_codes(tiny_vq):
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        tiny_vq.decode_code(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match="integer tensor"):
        tiny_vq.decode_code(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="B\\*h\\*w"):
        tiny_vq.decode_code(torch.zeros(1, 16, dtype=torch.long), [1, 8, 3, 3])


# ------------------------------------------------------------ checkpoints
def test_loads_ddp_fsdp_and_wrapped_files(tiny, tmp_path):
    cfg = OmegaConf.load(TINY_CONFIG)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    files = {
        "ddp.pt": {"model": state, "optimizer": {}, "steps": 5, "args": argparse.Namespace(gpt_model="GPT-B")},
        "deepspeed.pt": {"module": state},
        "state_dict.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "fsdp.pt": state,
        "compiled.pt": {"model": {f"_orig_mod.{k}": v for k, v in state.items()}},
    }
    with torch.no_grad():
        expected = tiny(GOLDEN["run1.tokens"], torch.tensor([3, 7]))
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        model = load_gpt(cfg, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(model(GOLDEN["run1.tokens"], torch.tensor([3, 7])), expected), name
    assert load_gpt(cfg, TINY_WEIGHTS).rope.device.type == "cpu"
    save_file({k: v.bfloat16() for k, v in state.items()}, tmp_path / "bf16.safetensors")
    model = load_gpt(cfg, tmp_path / "bf16.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.output.weight, state["output.weight"], atol=0.02, rtol=0.01)


def test_harmless_upstream_extras_are_dropped_and_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["freqs_cis"] = torch.zeros(17, 8, 2)
    state["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1, 4, 24, 16)
    save_file(state, tmp_path / "extras.safetensors")
    with pytest.warns(UserWarning, match="freqs_cis, layers.0.attention.kv_cache.k_cache"):
        load_gpt(OmegaConf.load(TINY_CONFIG), tmp_path / "extras.safetensors")
    state["layers.0.attention.bogus"] = torch.zeros(1)
    save_file(state, tmp_path / "bogus.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="unexpected keys: layers.0.attention.bogus"):
        load_gpt(OmegaConf.load(TINY_CONFIG), tmp_path / "bogus.safetensors")


def _one_line_error(cfg, path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        load_gpt(cfg, path)
    assert "\n" not in str(err.value)


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    cfg = OmegaConf.load(TINY_CONFIG)
    _one_line_error(cfg, FIXTURES / "rar_tiny_weights.safetensors", "not a LlamaGen class-conditional GPT")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _one_line_error(cfg, tmp_path / "list.pt", "found list.*expected a state dict")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02not a checkpoint" * 50)
    _one_line_error(cfg, tmp_path / "garbage.pt", "could not read LlamaGen GPT checkpoint .*download it again")
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _Evil()}, tmp_path / "pickled.pt")
    _one_line_error(cfg, tmp_path / "pickled.pt", "holds pickled objects")
    bigger = OmegaConf.load(TINY_CONFIG)
    bigger.model.generator.n_layer = 3
    _one_line_error(bigger, TINY_WEIGHTS, "dim 64 and 2 layers, but the config builds dim 64 and 3 layers")
    with pytest.raises(FileNotFoundError, match="huggingface.co/FoundationVision/LlamaGen"):
        load_gpt(cfg, tmp_path / "c2i_B_256.pt", source=SOURCE)


def test_invalid_architecture_is_rejected():
    for key, value, match in (("n_kv_head", 3, "multiple of n_kv_head"), ("block_size", 15, "square"),
                              ("cls_token_num", 2, "cls_token_num must be 1"), ("n_head", 3, "head_dim")):
        cfg = OmegaConf.load(TINY_CONFIG)
        cfg.model.generator[key] = value
        with pytest.raises(ValueError, match=match):
            GPT(cfg)
    cfg = OmegaConf.load(TINY_CONFIG)
    cfg.model.generator.class_dropout_prob = 0.0
    model = GPT(cfg)
    assert model.cls_embedding.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="cannot run CFG"):
        model.none_condition_ids(torch.tensor([1]))


def test_vq_loads_wrapped_file_strictly(tiny_vq, tmp_path):
    state = tiny_vq.state_dict()
    torch.save({"model": state, "args": argparse.Namespace(vq_model="VQ-16")}, tmp_path / "vq.pt")
    loaded = load_vq(tmp_path / "vq.pt", **SPEC["vq_config"])
    assert torch.equal(loaded.decode_code(GOLDEN["vq.codes"]), tiny_vq.decode_code(GOLDEN["vq.codes"]))
    del state["quantize.codebook_used"]
    torch.save({"model": state}, tmp_path / "no_usage.pt")
    with pytest.raises(CheckpointError, match="missing keys: quantize.codebook_used"):
        load_vq(tmp_path / "no_usage.pt", **SPEC["vq_config"])


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))
