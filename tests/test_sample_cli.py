"""alitok/sample_imagenet.py end to end on the tiny golden generator + tokenizer:
CLI parsing, determinism across process counts, resume, npz, and every bad input."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import softcfg_patch as sp
from softcfg_patch.errors import ConfigError
from softcfg_patch.run import config as run_config
from softcfg_patch.run import output, runner
from conftest import ROOT

SCRIPT = ROOT / "alitok" / "sample_imagenet.py"
TINY = "tests/configs/alitok_tiny.yaml"


def run_cli(*args, cwd=ROOT, check=True, nproc=1, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(*args):
    return run_config.parse_cli(list(args), "alitok")


def read_outputs(out):
    with np.load(f"{out}.npz") as npz:
        images = npz["arr_0"]
    with np.load(f"{out}_tokens.npz") as npz:
        tokens, labels = npz["tokens"], npz["labels"]
    return images, tokens, labels


def assert_close_images(a, b):
    """Decoded pixels from different processes or thread counts: a float32 sum may round
    differently (1 ulp), and the truncating uint8 conversion turns that into one level in
    a few pixels. Allow exactly that, nothing more."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1, f"pixels differ by up to {diff.max()} levels"
    assert np.count_nonzero(diff) <= max(10, a.size // 10_000), f"{np.count_nonzero(diff)} values differ"


def assert_same_samples(out_a, out_b):
    """Tokens and labels exactly; images within one level (see assert_close_images)."""
    (images_a, tokens_a, labels_a), (images_b, tokens_b, labels_b) = read_outputs(out_a), read_outputs(out_b)
    assert np.array_equal(tokens_a, tokens_b) and np.array_equal(labels_a, labels_b)
    assert_close_images(images_a, images_b)


# ------------------------------------------------------------------- parsing
def test_both_cli_styles_give_the_same_config():
    dashed = parse("--config", TINY, "--model.generator.guidance_scale=9", "--model.generator.step_norm",
                   "False", "--sample.seed=3")
    plain = parse(f"config={TINY}", "model.generator.guidance_scale=9", "model.generator.step_norm=False",
                  "sample.seed=3")
    assert dashed == plain
    assert plain.model.generator.guidance_scale == 9 and plain.model.generator.step_norm is False


@pytest.mark.e2e
def test_relative_config_resolves_from_repo_root_and_help_lists_defaults():
    proc = run_cli("--config", "configs/alitok_xl.yaml", "--help", cwd=ROOT / "alitok")
    assert "--model.generator.guidance_scale=13.0" in proc.stdout
    assert "--model.generator.softcfg_strength=0.0" in proc.stdout
    assert "--sample.num_fid_samples=50000" in proc.stdout


@pytest.mark.parametrize("arg,match", [
    ("--model.generator.guidance_scal=3", "did you mean 'model.generator.guidance_scale'"),
    ("--model.generator.step_norm=maybe", "True or False"),
    ("--sample.per_proc_batch_size=2.5", "whole number"),
    ("--sample.per_proc_batch_size=0", "positive whole number"),
    ("--model.generator.softcfg_align=left", "softcfg_align"),
    ("--model.generator.guidance_scale=abc", "takes a number"),
    ("--sample.precision=fp8", "fp32, tf32, bf16"),
])
def test_bad_options_are_rejected_with_a_reason(arg, match):
    with pytest.raises(ConfigError, match=match):
        parse("--config", TINY, arg)


@pytest.mark.e2e
def test_bad_input_exits_2_with_a_message_and_missing_checkpoint_names_the_source(tmp_path):
    proc = run_cli("--config", "configs/nope.yaml", check=False)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    proc = run_cli("--config", TINY, f"--experiment.output_dir={tmp_path / 'o'}",
                   "--experiment.generator_checkpoint=weights/none.bin", check=False)
    assert proc.returncode == 2 and "ali-vilab/alitok" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "samples"
    run_cli("--config", TINY, f"--experiment.output_dir={out}", "--sample.num_fid_samples=5",
            "--sample.save_tokens=True", "--model.generator.softcfg_strength=1")
    return out


@pytest.mark.e2e
def test_outputs_are_pngs_npz_and_tokens_from_the_documented_seeds(single_run, tiny_alitok):
    images, tokens, labels = read_outputs(single_run)
    assert images.shape == (5, 256, 256, 3) and images.dtype == np.uint8
    assert tokens.shape == (5, 273) and list(labels) == [0, 1, 2, 3, 4]
    for i in range(5):  # same process wrote both: exact
        assert np.array_equal(np.asarray(Image.open(single_run / f"{i:06d}.png")), images[i])
    # Batch k (size 2) is sample.seed-and-k seeded: recompute batch 1 independently.
    g = sp.Guidance(guidance_scale=3.0, guidance_scale_pow=1.0, softcfg_strength=1.0)
    gen = torch.Generator().manual_seed(runner.batch_seed(0, 1))
    expected = sp.generate(tiny_alitok, torch.tensor([2, 3]), g, generator=gen)
    assert np.array_equal(tokens[2:4], expected.numpy())
    from alitok.tokenizer import load_tokenizer
    from softcfg_patch.layers import unit_to_uint8_hwc as to_uint8_hwc
    tok = load_tokenizer(ROOT / "tests/fixtures/alitok_tokenizer_tiny_weights.safetensors", encoder_width=64,
                         encoder_layers=1, encoder_heads=4, decoder_width=64, decoder_layers=2,
                         decoder_heads=4, token_size=8, codebook_size=64)
    # decoded here with this process's threads, there with one: pixels within one level
    assert_close_images(to_uint8_hwc(tok.decode_tokens(expected)).numpy(), images[2:4])
    with np.load(f"{single_run}.npz") as npz:  # ADM's arr_0 plus labels and the run manifest
        assert list(npz["labels"]) == [0, 1, 2, 3, 4] and npz["labels"].dtype == np.int64
        manifest = json.loads(str(npz["manifest"]))
    assert manifest == json.loads((single_run / "manifest.json").read_text())
    assert manifest["images"]["sample.seed"] == 0 and manifest["images"]["sample.per_proc_batch_size"] == 2
    assert manifest["images"]["model.generator.softcfg_strength"] == 1.0
    assert len(manifest["images"]["generator.sha256"]) == 64 and manifest["images"]["tokenizer.size"] > 0
    with np.load(f"{single_run}_tokens.npz") as npz:
        assert json.loads(str(npz["manifest"])) == manifest


@pytest.mark.e2e
def test_two_processes_give_the_same_samples_as_one(single_run, tmp_path):
    out = tmp_path / "ddp"
    run_cli("--config", TINY, f"--experiment.output_dir={out}", "--sample.num_fid_samples=5",
            "--sample.save_tokens=True", "--model.generator.softcfg_strength=1", nproc=2)
    assert_same_samples(single_run, out)


@pytest.mark.e2e
def test_resume_fills_in_deleted_pngs_and_keeps_the_rest(single_run, tmp_path):
    import shutil
    out = tmp_path / "resume"
    shutil.copytree(single_run, out)
    (out / "000001.png").unlink()
    (out / "000004.png").unlink()
    kept = (out / "000002.png").stat().st_mtime_ns
    proc = run_cli("--config", TINY, f"--experiment.output_dir={out}", "--sample.num_fid_samples=5",
                   "--sample.save_tokens=True", "--model.generator.softcfg_strength=1")
    assert "resuming: 1 of 3 batches" in proc.stdout
    assert (out / "000002.png").stat().st_mtime_ns == kept
    assert_same_samples(single_run, out)


@pytest.mark.e2e
def test_resume_after_a_killed_run(single_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(SCRIPT), "--config", TINY, f"--experiment.output_dir={out}",
            "--sample.num_fid_samples=5", "--sample.save_tokens=True", "--model.generator.softcfg_strength=1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "000001.png").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(f"{out}.npz"), "the kill should land before the run finished"
    for png in out.glob("*.png"):  # every file that has its final name is complete
        assert np.asarray(Image.open(png)).shape == (256, 256, 3)
    run_cli(*args[2:])
    assert_same_samples(single_run, out)


@pytest.mark.e2e
def test_tokens_only_mode_writes_no_images(tmp_path):
    out = tmp_path / "tok"
    run_cli("--config", TINY, f"--experiment.output_dir={out}", "--sample.num_fid_samples=2",
            "--sample.tokens_only=True")
    assert not list(out.glob("*.png")) and not os.path.exists(f"{out}.npz")
    with np.load(f"{out}_tokens.npz") as npz:
        assert npz["tokens"].shape == (2, 273)


def test_npz_streaming_writer_is_readable_by_numpy(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        output.save_png(output.png_path(tmp_path, i), im)
    path = output.write_npz_from_pngs(tmp_path, 3, tmp_path / "x.npz")
    with np.load(path) as npz:
        assert np.array_equal(npz["arr_0"], images)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.e2e
def test_rar_sampler_end_to_end_under_torchrun(tmp_path):
    """rar/sample_imagenet.py: same CLI and machinery; 2 processes, tiny RAR + tiny VQGAN."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from rar.model import RAR
    out = tmp_path / "rar"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "rar" / "sample_imagenet.py"), "config=tests/configs/rar_tiny.yaml",
           f"experiment.output_dir={out}", "sample.num_fid_samples=3", "sample.save_tokens=True",
           "model.generator.softcfg_strength=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    images, tokens, labels = read_outputs(out)
    assert images.shape == (3, 256, 256, 3) and images.dtype == np.uint8 and list(labels) == [0, 1, 2]
    assert len(list(out.glob("*.png"))) == 3
    model = RAR(OmegaConf.load(ROOT / "tests/configs/rar_tiny.yaml")).eval()
    model.load_state_dict(load_file(ROOT / "tests/fixtures/rar_tiny_weights.safetensors"))
    g = sp.Guidance(guidance_scale=3.0, guidance_scale_pow=1.0, softcfg_strength=1.0)
    gen = torch.Generator().manual_seed(runner.batch_seed(0, 1))  # batch 1 ran on rank 1
    assert np.array_equal(tokens[2:], sp.generate(model, torch.tensor([2]), g, generator=gen).numpy())
