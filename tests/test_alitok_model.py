"""AliTok AR generator: checkpoint layout and numerics against the upstream golden vectors."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import softcfg_patch as sp
from alitok.model import ARModel, rotary_table
from softcfg_patch.checkpoint import CheckpointError, load_checkpoint, load_state
from conftest import FIXTURES, ROOT, load_golden

IO = load_golden("alitok_ar_tiny_io.safetensors")
KEYS = json.loads((FIXTURES / "keys_alitok_ar.json").read_text())


@pytest.mark.parametrize("size", ["b", "l", "xl"])
def test_state_dict_keys_and_shapes_equal_official(size):
    config = OmegaConf.load(ROOT / "configs" / f"alitok_{size}.yaml")
    with torch.device("meta"):
        model = ARModel(config)
    expected = KEYS[f"alitok_{size}"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in expected["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]


def test_rotary_table_equals_golden():
    table = rotary_table(16, prefix_len=17, grid_size=16)
    torch.testing.assert_close(table, IO["freqs_cis"], atol=1e-6, rtol=0)
    assert torch.all(table[0] == 0)  # condition position: q and k vanish


def test_full_forward_and_intermediates_equal_golden(tiny_alitok):
    with torch.no_grad():
        logits = tiny_alitok(IO["cfg_tokens"], IO["cfg_cond_ids"])
    torch.testing.assert_close(logits, IO["logits_full"], atol=1e-4, rtol=1e-4)

    seen = {}
    hooks = [tiny_alitok.embeddings.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", o)),
             tiny_alitok.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))]
    hooks += [b.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
              for n, b in enumerate(tiny_alitok.blocks)]
    with torch.no_grad():
        tiny_alitok(IO["tokens"], IO["cond_ids"])
    for h in hooks:
        h.remove()
    for ours, golden in (("embed", "inter_embed_out"), (0, "inter_block0_out"),
                         (1, "inter_block1_out"), ("norm", "inter_final_norm_out")):
        torch.testing.assert_close(seen[ours], IO[golden], atol=1e-4, rtol=1e-4)


def test_kv_decode_equals_golden(tiny_alitok):
    """Teacher-forced static-cache decoding of the CFG batch gives the upstream KV logits."""
    B = 2
    steps = []
    sp.decode_loop(tiny_alitok, IO["labels"], sp.Guidance(guidance_scale=3.0), forced_tokens=IO["tokens"],
                   on_step=lambda t, c, u, *rest: steps.append(torch.cat([c, u])))
    ours = torch.stack(steps, 1)
    torch.testing.assert_close(ours, IO["logits_kv"], atol=1e-4, rtol=1e-4)
    assert ours.shape == (2 * B, 273, 64)


@pytest.mark.parametrize("run,seed,gs,pw,temp", [("run1", 42, 3.0, 1.0, 1.0), ("run2", 7, 9.0, 1.5, 0.9)])
def test_cfg_generate_equals_golden(tiny_alitok, run, seed, gs, pw, temp):
    gen = load_golden("alitok_ar_tiny_generate.safetensors")
    g = sp.Guidance(guidance_scale=gs, guidance_scale_pow=pw, randomize_temperature=temp)
    tokens = sp.generate(tiny_alitok, IO["labels"], g, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(tokens, gen[f"{run}_tokens"])
    guided = sp.guided_logits(tiny_alitok, IO["labels"], gen[f"{run}_tokens"], g)
    torch.testing.assert_close(guided, gen[f"{run}_step_guided_logits_over_temp"].transpose(0, 1),
                               atol=5e-4, rtol=0)


def test_small_rotary_layout_is_configurable():
    config = OmegaConf.create({"model": {"vq_model": {"codebook_size": 17}, "generator": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_seq_len": 64,
        "condition_num_classes": 10, "rope_prefix_len": 0, "rope_grid_size": 8}}})
    model = ARModel(config).eval()
    assert model.rope.shape == (65, 8, 2) and model.num_image_tokens == 64
    tokens = sp.generate(model, torch.arange(3), sp.Guidance(softcfg_strength=1.0),
                         generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 64) and tokens.max() < 17


def test_inconsistent_rotary_layout_is_rejected():
    config = OmegaConf.load(FIXTURES / "alitok_ar_tiny_config.yaml")
    config.model.generator.image_seq_len = 256
    with pytest.raises(ValueError, match="rope_prefix_len"):
        ARModel(config)


def test_checkpoint_errors_are_actionable(tiny_alitok, tmp_path):
    kw = dict(what="AliTok generator", source="the AliTok release")
    with pytest.raises(FileNotFoundError, match="AliTok release"):
        load_checkpoint(tiny_alitok, tmp_path / "missing.bin", **kw)
    truncated = tmp_path / "trunc.bin"
    torch.save(tiny_alitok.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tiny_alitok, truncated, **kw)
    with pytest.raises(CheckpointError, match="missing keys: blocks.0"):
        load_checkpoint(tiny_alitok, FIXTURES / "rar_tiny_weights.safetensors", **kw)


def test_checkpoint_loads_pth_wrapped_and_ddp_prefixed(tiny_alitok, tmp_path):
    state = {f"module.{k}": v.clone() for k, v in tiny_alitok.state_dict().items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, path)
    config = OmegaConf.load(FIXTURES / "alitok_ar_tiny_config.yaml")
    fresh = load_checkpoint(ARModel(config), path, what="AliTok generator", source="x")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tiny_alitok.state_dict().values()))


def test_load_state_fills_counters_and_casts_on_a_meta_module():
    """The shared core (also the Inception loader's): zero-filled BN counters, dtype cast, no copy."""
    with torch.device("meta"):
        module = torch.nn.BatchNorm1d(3)
    state = {k: torch.arange(3, dtype=torch.float64) + 1 for k in ("weight", "bias", "running_mean", "running_var")}
    load_state(module, state, path="p", what="bn", source="x", zero_fill=("num_batches_tracked",))
    assert module.num_batches_tracked.device.type == "cpu" and int(module.num_batches_tracked) == 0
    assert module.weight.dtype == torch.float32 and torch.equal(module.running_var, torch.tensor([1.0, 2, 3]))
    with torch.device("meta"):
        module = torch.nn.BatchNorm1d(3)
    with pytest.raises(CheckpointError, match="missing keys: num_batches_tracked"):  # only when asked
        load_state(module, state, path="p", what="bn", source="x")


def test_checkpoint_refuses_pickled_objects(tmp_path):
    """weights_only loading never executes arbitrary pickles."""
    path = tmp_path / "evil.bin"
    torch.save({"x": torch.zeros(1), "obj": _Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(torch.nn.Linear(1, 1), path, what="test", source="x")


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))
