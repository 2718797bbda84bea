"""Trustworthy sampler runs (issue 11): the run manifest (resume only on a match, extend,
overwrite), early one-line errors (exit 2, never a traceback) and their order: every input
checked before any model is built. Most cases run the sampler in-process on the tiny models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, FIXTURES
from softcfg_patch.errors import ConfigError
from softcfg_patch.files import file_identity
from softcfg_patch.guidance import Guidance
from softcfg_patch.run import config as run_config
from softcfg_patch.run import manifest as mf
from softcfg_patch.run import output, registry, runner
from softcfg_patch.checkpoint import CheckpointError, read_state_dict

ALITOK = registry.get("alitok")

sys.path.insert(0, str(ROOT / "tests"))
from test_sample_cli import (SCRIPT, TINY, assert_close_images, assert_same_samples,  # noqa: E402
                             free_port, read_outputs, single_run)  # noqa: F401  (single_run: fixture)

GEN = FIXTURES / "alitok_ar_tiny_weights.safetensors"
SAME = ("--sample.num_fid_samples=5", "--sample.save_tokens=True", "--model.generator.softcfg_strength=1")


def sample(capsys, *args):
    """alitok/sample_imagenet.py's main in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        runner.main(["--config", TINY, *args], ALITOK)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the sampler keeps the test's thread count


def copy_run(single_run, dest):
    shutil.copytree(single_run, dest)
    for suffix in (".npz", "_tokens.npz"):
        shutil.copy(f"{single_run}{suffix}", f"{dest}{suffix}")
    return dest


def snapshot(out):
    """Every file of a finished run (the lock file records its latest holder, so it is left out)."""
    files = list(out.iterdir()) + [p for p in (out.parent / f"{out.name}.npz",) if p.exists()]
    return {p.name: p.read_bytes() for p in files if p.is_file() and p.name != ".lock"}


# ------------------------------------------------------------- manifest, pure functions
def manifest_with(**images):
    base = {"sample.seed": 0, "sample.per_proc_batch_size": 2, "sample.num_fid_samples": 5,
            "generator.sha256": "aa", "generator.size": 10, "tokenizer.sha256": "bb", "tokenizer.size": 3}
    return mf.make_manifest({**base, **images}, {"torch": "2.13.0", "cuda": None, "gpu": None})


def test_verdicts_and_the_one_line_description():
    old = manifest_with()
    assert mf.verdict(old, manifest_with()) == "resume"
    assert mf.verdict(old, manifest_with(**{"sample.num_fid_samples": 9})) == "extend"
    assert mf.verdict(old, manifest_with(**{"sample.num_fid_samples": 4})) == "differ"
    new = manifest_with(**{"sample.num_fid_samples": 9, "sample.seed": 1})
    assert mf.verdict(old, new) == "differ"
    assert mf.describe_differences(old, new) == "sample.num_fid_samples 5 -> 9, sample.seed 0 -> 1"
    tokens_only = manifest_with()
    del tokens_only["images"]["tokenizer.sha256"], tokens_only["images"]["tokenizer.size"]
    assert mf.verdict(tokens_only, old) == mf.verdict(old, tokens_only) == "resume"  # same tokens
    assert mf.verdict(old, manifest_with(**{"tokenizer.sha256": "cc"})) == "differ"
    moved = {**old, "recorded": {"torch": "2.14.0", "cuda": "12.8", "gpu": None}}
    assert mf.verdict(old, moved) == "resume"
    assert mf.recorded_changes(old, moved) == ["torch '2.13.0' -> '2.14.0'", "cuda (absent) -> '12.8'"]


def test_partial_last_batch_and_file_identity(tmp_path):
    assert mf.partial_last_batch(6, 2) is None
    assert mf.partial_last_batch(5, 2) == (2, range(4, 5))
    (tmp_path / "w").write_bytes(b"abc")
    assert file_identity(tmp_path / "w", chunk_bytes=2) == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "size": 3}


def tiny_manifest(*args):
    config = run_config.parse_cli(["--config", TINY, *args], "alitok")
    runner.check_inputs(config, ALITOK.checkpoints, want_decoder=True)
    return runner.run_manifest(config, ALITOK, True, torch.device("cpu"))


def test_checkpoints_are_identified_by_content_not_path(tmp_path):
    shutil.copy(GEN, tmp_path / "copy.safetensors")
    edited = bytearray(GEN.read_bytes())
    edited[-1] ^= 1
    (tmp_path / "edited.safetensors").write_bytes(bytes(edited))
    base = tiny_manifest()
    moved = tiny_manifest(f"--experiment.generator_checkpoint={tmp_path / 'copy.safetensors'}")
    other = tiny_manifest(f"--experiment.generator_checkpoint={tmp_path / 'edited.safetensors'}")
    assert mf.verdict(base, moved) == "resume" and moved["recorded"]["generator.path"] != base["recorded"][
        "generator.path"]
    assert mf.verdict(base, other) == "differ"
    assert "generator.sha256" in mf.describe_differences(base, other)
    keys = set(base["images"])  # the contract with evaluations/compare.py
    assert {f"model.generator.{k}" for k in Guidance().to_dict()} <= keys
    assert {"sample.seed", "sample.per_proc_batch_size", "sample.num_fid_samples", "sample.precision",
            "generator.sha256", "generator.size", "tokenizer.sha256", "tokenizer.size", "softcfg.version"} <= keys
    assert base["format"] == 1 and {"torch", "cuda", "gpu", "created", "generator.path"} <= set(base["recorded"])
    assert base["recorded"]["generator.pinned"] == "unknown file"  # the tiny golden model is no published file


def test_folder_with_samples_but_no_manifest_is_refused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "000000.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no manifest.*sample.overwrite=True"):
        output.prepare_output(out, manifest_with(), overwrite=False)
    assert (out / "000000.png").read_bytes() == b"x"
    output.prepare_output(out, manifest_with(), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_npz_step_refuses_a_manifest_changed_by_another_run(tmp_path):
    written, _ = output.prepare_output(tmp_path, manifest_with(), overwrite=False)
    assert json.loads(output.check_manifest_unchanged(tmp_path, written)) == written
    output.prepare_output(tmp_path, manifest_with(**{"sample.seed": 7}), overwrite=True)
    with pytest.raises(ConfigError, match="another run changed.*sample.seed 7 -> 0"):
        output.check_manifest_unchanged(tmp_path, written)


# ----------------------------------------------------------------- resume decisions
@pytest.mark.e2e
def test_other_settings_are_refused_and_overwrite_replaces_them(single_run, tmp_path, capsys):
    out = copy_run(single_run, tmp_path / "run")
    before = snapshot(out)
    code, _, err = sample(capsys, f"--experiment.output_dir={out}", *SAME, "--sample.seed=1",
                          "--model.generator.guidance_scale=4")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("model.generator.guidance_scale 3.0 -> 4.0, sample.seed 0 -> 1. Use another "
            "--experiment.output_dir, or pass --sample.overwrite=True") in err
    assert snapshot(out) == before  # nothing finished was touched
    code, _, err = sample(capsys, f"--experiment.output_dir={out}", "--sample.num_fid_samples=2",
                          "--sample.seed=1", "--sample.overwrite=True")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    assert not (out / "tokens").exists() and not os.path.exists(f"{out}_tokens.npz")
    with np.load(f"{out}.npz") as npz:
        assert npz["arr_0"].shape[0] == 2 and json.loads(str(npz["manifest"]))["images"]["sample.seed"] == 1


def test_extending_regenerates_the_partial_last_batch_whole(single_run, tmp_path, capsys):
    out = tmp_path / "grow"
    code, _, err = sample(capsys, f"--experiment.output_dir={out}", *SAME[1:], "--sample.num_fid_samples=3")
    assert code == 0, err
    kept = (out / "000001.png").stat().st_mtime_ns
    code, stdout, err = sample(capsys, f"--experiment.output_dir={out}", *SAME)
    assert code == 0, err
    assert "extending from 3 to 5 samples" in stdout and (out / "000001.png").stat().st_mtime_ns == kept
    assert_same_samples(single_run, out)  # batch 1 = samples 2, 3 drawn as one batch of two


def test_truncated_png_is_regenerated_and_environment_changes_only_warn(single_run, tmp_path, capsys):
    out = copy_run(single_run, tmp_path / "cut")
    data = (out / "000003.png").read_bytes()
    (out / "000003.png").write_bytes(data[: len(data) // 2])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["recorded"]["torch"] = "1.0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, err = sample(capsys, f"--experiment.output_dir={out}", *SAME)
    assert code == 0, err
    assert "warning: the environment changed" in err and "torch '1.0' -> " in err
    assert "resuming: 2 of 3 batches" in stdout
    assert np.asarray(Image.open(out / "000003.png")).shape == (256, 256, 3)
    assert_same_samples(single_run, out)


# --------------------------------------------------------- early, one-line errors (exit 2)
@pytest.mark.parametrize("args,message", [
    (("--experiment.output_dir=",), "experiment.output_dir is empty"),
    (("--sample.seed=-1",), "sample.seed must be a whole number >= 0"),
    (("--model.generator.dropout=0.1",), "only matters for training"),
])
def test_bad_options_exit_2_in_one_line(args, message, capsys):
    code, _, err = sample(capsys, *args)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_no_config_exits_2_saying_it_is_required(capsys):
    with pytest.raises(SystemExit) as stop:
        runner.main([], "alitok")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: --config is required") and err.count("\n") == 1


@pytest.mark.parametrize("config,entry,message", [
    ("configs/rar_xl.yaml", "alitok", "is a RAR config (it sets model.generator.intermediate_size): use "
                                      "rar/sample_imagenet.py"),
    ("configs/alitok_xl.yaml", "rar", "is an AliTok config (it has no model.generator.intermediate_size): "
                                      "use alitok/sample_imagenet.py"),
])
def test_a_config_of_the_other_family_is_named(config, entry, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_config.parse_cli(["--config", config], entry)


def test_every_missing_or_bad_input_is_listed_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    html = tmp_path / "alitok_xl.bin"
    html.write_text("\n<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title>")
    built = []
    monkeypatch.setattr("alitok.model.load_generator", lambda *args: built.append(1))
    code, _, err = sample(capsys, f"--experiment.output_dir={tmp_path / 'o'}",
                          f"--experiment.generator_checkpoint={html}",
                          "--experiment.tokenizer_checkpoint=weights/nope.pth")
    assert code == 2 and not built and err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert "2 input file problem(s)" in err
    assert "is not a checkpoint: it looks like an HTML page; use the direct download link" in err
    assert f"'weights/nope.pth' not found (tried {os.getcwd()}/weights/nope.pth" in err
    assert "github.com/ali-vilab/alitok" in err
    with pytest.raises(CheckpointError, match="looks like an HTML page"):  # the loader says it too
        read_state_dict(html, what="AliTok generator", source="github.com/ali-vilab/alitok")


def test_checkpoint_paths_resolve_like_config_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = run_config.parse_cli(["--config", TINY], "alitok")
    runner.check_inputs(config, ALITOK.checkpoints, want_decoder=True)
    assert config.experiment.generator_checkpoint == str(GEN)
    with pytest.raises(ConfigError, match=f"tried {tmp_path}/w.bin, {ROOT}/w.bin"):
        runner.check_inputs(OmegaConf.merge(config, {"experiment": {"generator_checkpoint": "w.bin"}}),
                              ALITOK.checkpoints, want_decoder=False)


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    code, _, err = sample(capsys, f"--experiment.output_dir={tmp_path / 'taken'}")
    assert code == 2 and "is a file, not a folder" in err and (tmp_path / "taken").read_text() == "mine"


def test_threads_split_the_cores_between_local_processes():
    assert runner.threads_per_process({"OMP_NUM_THREADS": "3"}, 16) is None
    assert runner.threads_per_process({"LOCAL_WORLD_SIZE": "4"}, 16) == 4
    assert runner.threads_per_process({"LOCAL_WORLD_SIZE": "4"}, 2) == 1
    assert runner.threads_per_process({}, 2) == 2


def test_seed_1e3_is_the_number_1000_and_help_describes_every_option(tmp_path):
    parse = lambda *a: run_config.parse_cli(["--config", TINY, *a], "alitok")  # noqa: E731
    assert parse("--sample.seed=1e3").sample.seed == 1000
    assert type(parse("--sample.seed=1e3").sample.seed) is int
    (tmp_path / "c.yaml").write_text((ROOT / TINY).read_text().replace("seed: 0", "seed: 1e3"))
    assert run_config.parse_cli(["--config", str(tmp_path / "c.yaml")], "alitok").sample.seed == 1000
    with pytest.raises(ConfigError, match="whole number"):
        parse("--sample.seed=1.5e0")
    for name in ("alitok_b", "alitok_xl", "rar_l", "rar_xxl"):
        family = registry.get(name)
        cls = run_config.schema(family)
        config = run_config.merge_file(OmegaConf.structured(cls), family, f"configs/{name}.yaml")
        text = run_config.help_text(config, cls, "x", name)
        options = [line for line in text.splitlines() if line.startswith("  --")]
        assert len(options) > 30 and all(len(line.split(None, 1)) == 2 for line in options)
        assert "(no description)" not in text and "--config is required" in text
        assert not any(key in text for key in run_config.TRAINING_ONLY)


# ----------------------------------------------------------- subprocess-only behaviours
def unprivileged(cmd):
    """The command as root without the capabilities that ignore file permissions (CI runs as
    root, and uid 65534 cannot start our Python under /root)."""
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]


@pytest.mark.e2e
def test_read_only_npz_folder_is_refused_before_sampling(tmp_path):
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    (ro / "out").chmod(0o777)  # the PNG folder is writable, its parent (the npz's folder) is not
    ro.chmod(0o555)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        probe = subprocess.run(unprivileged([sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"]),
                               env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, "the folder must really be read-only"
        for out, what in ((ro / "out", "the npz folder (parent of output_dir)"),
                          (ro / "new", "experiment.output_dir")):
            proc = subprocess.run(unprivileged([sys.executable, str(SCRIPT), "--config", TINY,
                                                f"--experiment.output_dir={out}"]),
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert f"error: {what} '" in proc.stderr and "is not writable (Permission denied" in proc.stderr
    finally:
        ro.chmod(0o755)
    assert list((ro / "out").iterdir()) == []


@pytest.mark.e2e
def test_torchrun_prints_the_reason_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(SCRIPT), "--config", TINY, f"--experiment.output_dir={tmp_path / 'o'}",
           "--experiment.generator_checkpoint=weights/none.bin"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stderr.count("error: 1 input file problem(s)") == 1, proc.stderr
    assert "Traceback" not in proc.stderr.split("error: 1 input file")[0]  # none from our processes
    assert proc.returncode == 1 and "ChildFailedError" in proc.stderr  # torchrun's own summary (README)


def test_table_runs_that_share_samples_give_the_sampler_the_same_settings():
    """scripts/run_setting.py shares one run between settings that differ only in unused keys;
    the sampler must then see identical guidance, or its manifest would refuse the second."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_setting
    cfg = {**run_setting.GUIDANCE_DEFAULTS, "guidance_scale": 13.0, "guidance_scale_pow": 1.4}
    a, b = {**cfg, "step_norm": False}, {**cfg, "softcfg_target": "k", "softcfg_min_weight": 0.1}
    assert run_setting.run_name("alitok_xl", False, a, 0, 4, 4) == run_setting.run_name("alitok_xl", False, b, 0, 4, 4)
    assert run_setting.sampler_guidance(a, "alitok_xl") == run_setting.sampler_guidance(b, "alitok_xl") == cfg
    soft = {**cfg, "softcfg_strength": 1.0, "step_norm": False}
    assert run_setting.sampler_guidance(soft, "alitok_xl") == soft  # every key matters for SoftCFG


def test_the_manifest_says_whether_a_checkpoint_is_the_published_file(capsys):
    from softcfg_patch.run import registry
    from softcfg_patch.run.runner import pinned_status
    published = registry.published("rar_b.bin").sha256
    assert pinned_status("weights/rar_b.bin", published) == "match" and not capsys.readouterr().err
    assert pinned_status("/elsewhere/rar_b.bin", "0" * 64) == "mismatch"
    assert "is not the published rar_b.bin" in capsys.readouterr().err
    assert pinned_status("weights/alitok_xl.bin", "0" * 64) == "unpinned"  # AliTok publishes no hashes
    assert pinned_status("weights/my_model.bin", "0" * 64) == "unknown file"
