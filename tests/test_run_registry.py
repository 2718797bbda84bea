"""The model registry and the generic runner: a toy family registered from this file alone
samples through `softcfg_patch.run`, and LlamaGen's sampler runs end to end on its tiny
golden config (tokens equal to an independent `generate`, images to the VQ decode)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import save_file

import softcfg_patch as sp
from conftest import FIXTURES, ROOT
from softcfg_patch.cache import causal_attention
from softcfg_patch.checkpoint import load_model
from softcfg_patch.run import Checkpoint, ModelFamily, Option, registry, runner
from softcfg_patch.run.config import parse_cli


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runner keeps the test's thread count


def sample(capsys, family, *args) -> tuple[int, str]:
    """The generic runner in this process: (exit code, stderr)."""
    code = 0
    try:
        runner.main(list(args), family)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def read_npz(path) -> dict:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


# ------------------------------------------------------------------ a toy family
class ToyGPT(nn.Module):
    """A one-block causal transformer over [class, 4 image tokens], V=8, 3 classes."""

    num_prefix_positions, num_layers, num_heads = 1, 1, 2

    def __init__(self, config) -> None:
        super().__init__()
        gen = config.model.generator
        self.num_image_tokens, self.vocab_size, self.num_classes = gen.tokens, gen.vocab, 3
        self.head_dim = gen.width // self.num_heads
        self.embed = nn.Embedding(self.vocab_size + self.num_classes + 1, gen.width)
        self.pos = nn.Parameter(torch.zeros(1 + self.num_image_tokens, gen.width))
        self.qkv = nn.Linear(gen.width, 3 * gen.width)
        self.head = nn.Linear(gen.width, self.vocab_size)

    def condition_ids(self, labels):
        return labels + self.vocab_size

    def none_condition_ids(self, labels):
        return torch.full_like(labels, self.vocab_size + self.num_classes)

    def prefill(self, condition_ids, cache):
        return self._run(self.embed(condition_ids)[:, None], 0, cache)

    def decode(self, tokens, step, cache):
        return self._run(self.embed(tokens)[:, None], step, cache)

    def _run(self, x, position, cache):
        x = x + self.pos[position]
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        x = x + causal_attention(q, k, v, cache, 0).transpose(1, 2).flatten(2)
        return self.head(x)[:, -1]


def load_toy(config, path, source):
    return load_model(lambda: ToyGPT(config), path, what="toy generator", source=source)


def toy_decoder(config, path, device, source):
    """Token t -> gray level 30 t, a 2x2 image per sample (no weights; `path` is unused)."""
    return lambda tokens: (tokens.view(-1, 2, 2, 1).expand(-1, -1, -1, 3) * 30).to(torch.uint8)


TOY = ModelFamily(
    name="toy", title="Toy", sizes=("s",), generator_class=f"{__name__}:ToyGPT",
    load_generator=f"{__name__}:load_toy", image_decoder=f"{__name__}:toy_decoder",
    generator={"width": Option(int, 16, "architecture: width"), "tokens": Option(int, 4, "image tokens"),
               "vocab": Option(int, 8, "codebook size")},
    vq_model={},
    checkpoints=(Checkpoint("experiment.generator_checkpoint", "toy generator checkpoint", "this test"),),
    batch_size=2, smoke_config="", example_config="toy.yaml", tokenizer_sizes=False)


def test_a_toy_family_registers_and_samples_through_the_generic_runner(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))  # register for this test only
    registry.register(TOY)
    (tmp_path / "toy.yaml").write_text("model:\n  generator:\n    guidance_scale: 2.0\n")
    config = OmegaConf.create({"model": {"generator": {"width": 16, "tokens": 4, "vocab": 8}}})
    torch.manual_seed(0)
    model = ToyGPT(config).eval()
    save_file(model.state_dict(), tmp_path / "toy.safetensors")
    out = tmp_path / "samples"
    code, err = sample(capsys, "toy", "--config", str(tmp_path / "toy.yaml"), f"--experiment.output_dir={out}",
                       f"--experiment.generator_checkpoint={tmp_path / 'toy.safetensors'}",
                       "--sample.num_fid_samples=5", "--sample.save_tokens=True", "--sample.device=cpu",
                       "--model.generator.softcfg_strength=1")
    assert code == 0, err
    tokens = read_npz(f"{out}_tokens.npz")
    images = read_npz(f"{out}.npz")
    assert list(tokens["labels"]) == [0, 1, 2, 0, 1] and tokens["tokens"].shape == (5, 4)
    guidance = sp.Guidance(guidance_scale=2.0, softcfg_strength=1.0)
    for k, rows in enumerate(runner.batch_plan(5, 2)):  # every batch, recomputed independently
        gen = torch.Generator().manual_seed(runner.batch_seed(0, k))
        expected = sp.generate(model, torch.tensor(tokens["labels"][rows.start:rows.stop]), guidance, generator=gen)
        assert np.array_equal(tokens["tokens"][rows.start:rows.stop], expected.numpy())
    assert np.array_equal(images["arr_0"][..., 0].reshape(5, 4), tokens["tokens"] * 30)
    manifest = json.loads(str(images["manifest"]))
    assert manifest["images"]["model.generator.softcfg_strength"] == 1.0
    with pytest.raises(SystemExit):  # --help comes from the schema, the toy's keys included
        parse_cli(["--config", str(tmp_path / "toy.yaml"), "--help"], "toy")
    assert re.search(r"\n  --model\.generator\.vocab=8 +codebook size\n", capsys.readouterr().out)


# ------------------------------------------------------------------ the registry
def test_every_config_belongs_to_a_registered_family_and_size():
    configs = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem != "digits")
    assert configs == sorted(registry.model_names())
    ranked = sorted(registry.model_names(), key=registry.size_rank)
    assert ranked.index("llamagen_b_256") < ranked.index("llamagen_3b") and ranked[0] == "alitok_b"
    for family in registry.MODELS.values():  # every lazy path names a real function
        assert all(callable(family.resolve(f)) for f in ("generator_class", "load_generator", "image_decoder"))
        assert (ROOT / family.script).is_file() and (ROOT / family.smoke_config).is_file()
        for size in family.sizes:
            parse_cli(["--config", f"configs/{family.config_name(size)}.yaml"], family.name)


# ------------------------------------------------------------------ LlamaGen
@pytest.fixture(scope="module")
def tiny_vq_file(tmp_path_factory):
    from test_llamagen import tiny_vq_state  # the golden recipe, checked by SHA-256
    path = tmp_path_factory.mktemp("vq") / "vq_tiny.safetensors"
    save_file(tiny_vq_state(), path)
    return path


def test_llamagen_sampler_end_to_end_on_the_tiny_config(tmp_path, capsys, tiny_vq_file):
    from llamagen import load_gpt, load_vq, resize_for_eval
    from softcfg_patch.layers import signed_to_uint8_hwc as to_uint8_hwc
    out = tmp_path / "llamagen"
    args = ["--config", "tests/configs/llamagen_tiny.yaml", f"--experiment.output_dir={out}",
            f"--experiment.tokenizer_checkpoint={tiny_vq_file}", "--sample.num_fid_samples=3",
            "--sample.labels=random", "--sample.save_tokens=True", "--sample.device=cpu",
            "--sample.precision=fp32", "--sample.image_size_eval=16", "--model.generator.softcfg_strength=1",
            "--model.generator.top_k=20"]
    code, err = sample(capsys, "llamagen", *args)
    assert code == 0, err
    tokens, images = read_npz(f"{out}_tokens.npz"), read_npz(f"{out}.npz")
    labels = tokens["labels"]
    assert images["arr_0"].shape == (3, 16, 16, 3) and np.array_equal(images["labels"], labels)
    assert labels.min() >= 0 and labels.max() < 10
    assert np.array_equal(labels, np.concatenate([runner.class_labels(r, 10, "random", 0, k)
                                                  for k, r in enumerate(runner.batch_plan(3, 2))]))
    assert not np.array_equal(runner.class_labels(range(0, 8), 10, "random", 0, 0),
                              runner.class_labels(range(0, 8), 10, "random", 1, 0))  # seeded
    config = OmegaConf.load(ROOT / "tests/configs/llamagen_tiny.yaml")
    model = load_gpt(config, FIXTURES / "llamagen" / "llamagen_gpt_tiny_weights.safetensors")
    guidance = sp.Guidance(guidance_scale=4.0, guidance_scale_pow=0.0, softcfg_strength=1.0, top_k=20)
    gen = torch.Generator().manual_seed(runner.batch_seed(0, 1))
    expected = sp.generate(model, torch.from_numpy(labels[2:]), guidance, generator=gen)
    assert np.array_equal(tokens["tokens"][2:], expected.numpy())
    vq = load_vq(tiny_vq_file, **config.model.vq_model)
    decoded = to_uint8_hwc(resize_for_eval(vq.decode_code(expected), 16)).numpy().astype(int)
    assert np.abs(decoded - images["arr_0"][2:].astype(int)).max() <= 1
    manifest = json.loads(str(images["manifest"]))["images"]
    assert manifest["sample.labels"] == "random" and manifest["model.generator.top_k"] == 20
    # A rerun with the other label rule is another setting: refused, samples kept.
    code, err = sample(capsys, "llamagen", *[a for a in args if a != "--sample.labels=random"],
                       "--sample.labels=balanced")
    assert code == 2 and "sample.labels 'random' -> 'balanced'" in err and err.count("\n") == 1


@pytest.mark.parametrize("arg,message", [
    (f"--experiment.generator_checkpoint={FIXTURES / 'rar_tiny_weights.safetensors'}",
     "is not a LlamaGen class-conditional GPT checkpoint"),
    ("--model.generator.top_p=0", "top_p must be"),
    ("--model.generator.top_k=-1", "top_k must be an integer >= 0"),
    ("--sample.labels=uniform", "sample.labels must be one of balanced, random"),
])
def test_llamagen_bad_inputs_get_one_line_errors(arg, message, tmp_path, capsys, tiny_vq_file):
    code, err = sample(capsys, "llamagen", "--config", "tests/configs/llamagen_tiny.yaml",
                       f"--experiment.output_dir={tmp_path / 'o'}", f"--experiment.tokenizer_checkpoint={tiny_vq_file}",
                       "--sample.num_fid_samples=1", "--sample.device=cpu", arg)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.e2e
def test_table_llamagen_smoke(tmp_path):
    """The one SMOKE run of scripts/table_llamagen.sh (tiny GPT, random VQ and Inception)."""
    from test_scripts import check_row, rows_of, smoke
    results = tmp_path / "results"
    smoke("table_llamagen.sh", results, "b")
    rows = {r["method"]: r for r in rows_of(results / "table_llamagen")}
    assert set(rows) == {"CFG", "SoftCFG"}  # SMOKE skips the grid (GRID=0)
    for row in rows.values():
        check_row(row)
        assert row["model"] == "llamagen_b_256" and row["config"] == "tests/configs/llamagen_tiny.yaml"
    # SMOKE swaps the networks but keeps the real settings: upstream's constant CFG 2.0
    cfg, soft = rows["CFG"]["guidance"], rows["SoftCFG"]["guidance"]
    assert (cfg["guidance_scale"], cfg["guidance_scale_pow"], cfg["softcfg_strength"]) == (2.0, 0.0, 0.0)
    assert (soft["guidance_scale"], soft["softcfg_strength"], soft["step_norm"]) == (2.0, 1.0, True)
    md = (results / "table_llamagen" / "results.md").read_text()
    assert "| llamagen_b_256 (SMOKE) | SoftCFG |" in md and "llamagen_b_256 5.46." in md


def test_a_missing_official_checkpoint_names_the_exact_download_command(tmp_path):
    from softcfg_patch.errors import ConfigError
    from softcfg_patch.run import runner
    from softcfg_patch.run.config import parse_cli
    config = parse_cli(["--config", "configs/alitok_xl.yaml", f"--experiment.output_dir={tmp_path / 'o'}",
                        f"--experiment.generator_checkpoint={tmp_path}/alitok_xl.bin",
                        f"--experiment.tokenizer_checkpoint={tmp_path}/AliTok.pth"], "alitok")
    with pytest.raises(ConfigError) as err:
        runner.check_inputs(config, registry.get("alitok").checkpoints, want_decoder=True)
    # the generator by its config (which also fetches the tokenizer); the shared tokenizer by name
    assert f"`softcfg-download alitok_xl --dir {tmp_path}`" in str(err.value)
    assert f"`softcfg-download AliTok.pth --dir {tmp_path}`" in str(err.value)
    config.experiment.generator_checkpoint = str(tmp_path / "my_own.bin")
    with pytest.raises(ConfigError, match="get it from the AliTok release"):
        runner.check_inputs(config, registry.get("alitok").checkpoints[:1], want_decoder=False)
