"""bf16 sampling (`sample.precision=bf16`): the generator's linear weights are stored in bf16
once, which must give exactly the tokens of autocast casting float32 weights at every call."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import softcfg_patch as sp
from conftest import FIXTURES, ROOT
from softcfg_patch.precision import store_linear_weights
from softcfg_patch.run import registry, runner

pytestmark = pytest.mark.usefixtures("one_thread")
SOFTCFG = sp.Guidance(guidance_scale=4.0, guidance_scale_pow=1.0, softcfg_strength=1.0, step_norm=True)


def tiny(family: str) -> torch.nn.Module:
    if family == "alitok":
        from alitok.model import ARModel as cls
        config, weights = FIXTURES / "alitok_ar_tiny_config.yaml", FIXTURES / "alitok_ar_tiny_weights.safetensors"
    elif family == "rar":
        from rar.model import RAR as cls
        config, weights = FIXTURES / "rar_tiny_config.yaml", FIXTURES / "rar_tiny_weights.safetensors"
    else:
        from llamagen import GPT as cls
        config = ROOT / "tests" / "configs" / "llamagen_tiny.yaml"
        weights = FIXTURES / "llamagen" / "llamagen_gpt_tiny_weights.safetensors"
    model = cls(OmegaConf.load(config)).eval()
    model.load_state_dict(load_file(weights), strict=True)
    return model


def bf16_tokens(model: torch.nn.Module, labels: torch.Tensor, compile=False) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return sp.generate(model, labels, SOFTCFG, generator=torch.Generator().manual_seed(3), compile=compile)


def test_only_linear_layers_change_dtype():
    model = tiny("alitok")
    before = {name: p.dtype for name, p in model.named_parameters()}
    linear = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
              for p, _ in mod.named_parameters(recurse=False)}
    assert store_linear_weights(model) is model and linear
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in linear else before[name]), name
    assert len(linear) < len(before)  # embeddings and norms exist and stayed float32


@pytest.mark.parametrize("family", ["alitok", "rar", "llamagen"])
def test_bf16_weights_give_the_logits_and_tokens_of_autocast(family):
    reference = tiny(family)
    cast = store_linear_weights(copy.deepcopy(reference))
    labels = torch.tensor([1, 7, 3]) % reference.num_classes
    tokens = bf16_tokens(reference, labels)
    assert torch.equal(bf16_tokens(cast, labels), tokens)
    with torch.no_grad():
        float_logits = sp.guided_logits(reference, labels, tokens, SOFTCFG)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = sp.guided_logits(reference, labels, tokens, SOFTCFG)
            cast_logits = sp.guided_logits(cast, labels, tokens, SOFTCFG)
    assert not torch.equal(autocast_logits, float_logits)  # bf16 really ran
    assert torch.equal(cast_logits, autocast_logits)


def test_bf16_weights_compiled_equal_eager():
    model = store_linear_weights(tiny("alitok"))
    labels = torch.tensor([2, 5])
    assert torch.equal(bf16_tokens(model, labels, compile="aot_eager"), bf16_tokens(model, labels))


def test_runner_stores_linear_weights_in_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = []
    monkeypatch.setattr(runner, "store_linear_weights", lambda m, d: seen.append(store_linear_weights(m, d)))
    out = tmp_path / "bf16"
    runner.main(["--config", "tests/configs/alitok_tiny.yaml", f"--experiment.output_dir={out}",
                 "--sample.num_fid_samples=2", "--sample.per_proc_batch_size=2", "--sample.tokens_only=True",
                 "--sample.precision=bf16", "--model.generator.softcfg_strength=1"], registry.get("alitok"))
    assert len(seen) == 1 and seen[0].output.weight.dtype == torch.bfloat16
    with np.load(f"{out}_tokens.npz") as npz:
        tokens, labels = npz["tokens"], npz["labels"]
    # the same batch drawn here: float32 weights, cast by autocast at every call
    config = OmegaConf.load(ROOT / "tests" / "configs" / "alitok_tiny.yaml")
    model = registry.get("alitok").resolve("load_generator")(config, str(FIXTURES / "alitok_ar_tiny_weights.safetensors"))
    guidance = sp.Guidance.from_config(OmegaConf.merge(config.model.generator, {"softcfg_strength": 1}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sp.generate(model, torch.from_numpy(labels).long(), guidance,
                               generator=torch.Generator().manual_seed(runner.batch_seed(0, 0)))
    assert np.array_equal(tokens, expected.numpy())
