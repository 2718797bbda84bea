"""softcfg_patch.guidance: the one rule for "is guidance on" (runs_cfg / method), which every
driver, the run manifest, run_setting.py's run names and the result rows use. The LlamaGen bug
it fixes: a run at scale 1 was named and recorded as CFG while its sampler ran one branch."""
from __future__ import annotations

import math
import sys

import pytest
import torch

import softcfg_patch as sp
from conftest import ROOT, load_golden
from softcfg_patch.guidance import method, runs_cfg
from softcfg_patch.run import config as run_config
from softcfg_patch.run import registry, runner

sys.path.insert(0, str(ROOT / "scripts"))
import run_setting  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_models():
    """The tiny golden generator of every family, loaded as the sampler loads it."""
    models = {}
    for family in registry.MODELS.values():
        config = run_config.parse_cli(["--config", family.smoke_config], family)
        runner.check_inputs(config, family.checkpoints, want_decoder=False)
        models[family.name] = (config, family.resolve("load_generator")(config, config.experiment.generator_checkpoint))
    return models


def rows_sampled(model, guidance: sp.Guidance) -> int:
    """How many rows the decode loop really runs per step, seen in the model's own prefill."""
    seen = []
    prefill = model.prefill
    model.prefill = lambda ids, cache: seen.append(ids.shape[0]) or prefill(ids, cache)
    try:
        sp.decode_loop(model, torch.tensor([1, 2]), guidance, generator=torch.Generator().manual_seed(0))
    finally:
        del model.prefill
    return seen[0]


@pytest.mark.parametrize("scale", [0.0, 1.0, 1.5])
@pytest.mark.parametrize("name", list(registry.MODELS))
def test_rows_run_name_manifest_and_row_agree(tiny_models, name, scale):
    family = registry.get(name)
    config, model = tiny_models[name]
    assert getattr(type(model), "unguided_at", "0") == family.unguided_at  # the registry says what the model does
    g = sp.Guidance(guidance_scale=scale, guidance_scale_pow=0.0, softcfg_strength=1.0)
    kind = method(g, family)
    assert kind == method(g, model)
    assert rows_sampled(model, g) == (4 if kind != "noguidance" else 2)
    guidance = {**run_setting.GUIDANCE_DEFAULTS, **g.to_dict()}
    assert f"_{kind}_seed0_" in run_setting.run_name(family.config_name(family.sizes[0]), False, guidance, 0, 4, 4)
    assert run_setting.method_kind(guidance, family.config_name(family.sizes[0])) == kind
    scaled = run_config.parse_cli(["--config", family.smoke_config, f"--model.generator.guidance_scale={scale}",
                                   "--model.generator.softcfg_strength=1"], family)
    runner.check_inputs(scaled, family.checkpoints, want_decoder=False)
    assert runner.run_manifest(scaled, family, False, torch.device("cpu"))["recorded"]["method"] == kind


def test_each_family_has_its_upstream_convention():
    expected = {"alitok": ("cfg", "cfg"), "rar": ("cfg", "cfg"), "llamagen": ("noguidance", "cfg")}
    for name, (at_one, at_1_01) in expected.items():
        family = registry.get(name)
        assert method(sp.Guidance(guidance_scale=0.0), family) == "noguidance"
        assert (method(sp.Guidance(guidance_scale=1.0), family), method(sp.Guidance(guidance_scale=1.01), family)) \
            == (at_one, at_1_01)
    assert method(sp.Guidance(guidance_scale=2.0, softcfg_strength=0.5)) == "softcfg"
    assert not runs_cfg(sp.Guidance(guidance_scale=1.0), type("Unbatched", (), {"unguided_at": "1"}))


# ----------------------------------------------------------------------------- schedule
def test_schedule_matches_golden_float32():
    golden = load_golden("softcfg/softcfg_tiny_generate.safetensors")["cfg_scale"]
    ours = torch.cat([sp.guidance_schedule(t, 273, 3.0, 1.0) for t in range(273)])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, golden, atol=1e-5, rtol=0)


def test_schedule_power_zero_is_constant_and_matches_closed_form():
    assert torch.all(torch.cat([sp.guidance_schedule(t, 10, 4.0, 0.0) for t in range(10)]) == 4.0)
    t, n, g, k = 7, 20, 9.0, 1.5
    expected = 1 + (g - 1) * (1 - math.cos(math.pi * (t / n) ** k)) / 2
    assert sp.guidance_schedule(t, n, g, k).item() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("kwargs,match", [
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"randomize_temperature": 0.0}, "randomize_temperature"),
    ({"softcfg_strength": float("nan")}, "softcfg_strength"),
    ({"step_norm": "yes"}, "step_norm"),
    ({"softcfg_confidence": "mean"}, "sampled"),
    ({"softcfg_align": "left"}, "source"),
    ({"softcfg_target": "q"}, "'kv'"),
    ({"softcfg_min_weight": 2.0}, "softcfg_min_weight"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"cfg_interval": -2}, "cfg_interval"),
])
def test_guidance_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.Guidance(**kwargs)
