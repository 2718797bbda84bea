"""From sampler to FID without PNGs (issue 23): sample.images=png|shards|none, the Inception
activations stored while sampling, the metrics scored from them, run folders read by the
evaluator and compare.py, and scripts/decode_tokens.py.

Every run here is the tiny golden generator and tokenizer in this process, scored with the
seeded random Inception recipe against a random reference: the metric values mean nothing,
but every route must give the same ones.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors.torch import save_file

from conftest import ROOT
from evaluations import compare, evaluator
from softcfg_patch.files import save_npz
from softcfg_patch.run import runner
from softcfg_patch.run.decode import decode_run
from softcfg_patch.shards import ACTIVATIONS, shard_arrays, shard_path
from test_sample_cli import assert_close_images, free_port

CONFIGS = {"alitok": "tests/configs/alitok_tiny.yaml", "rar": "tests/configs/rar_tiny.yaml",
           "llamagen": "tests/configs/llamagen_tiny.yaml"}
N, BATCH = 5, 2  # three batches, the last one short
SMALL = (f"--sample.num_fid_samples={N}", f"--sample.per_proc_batch_size={BATCH}", "--sample.device=cpu")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the sampler keeps the test's thread count


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random reference batch, the seeded random Inception network, LlamaGen's tiny VQ weights."""
    from omegaconf import OmegaConf

    from evaluations.inception import random_weights
    from llamagen.vq import random_weights as vq_weights
    folder = tmp_path_factory.mktemp("inputs")
    save_npz(folder / "ref.npz", np.random.default_rng(0).integers(0, 256, (6, 256, 256, 3), dtype=np.uint8))
    save_npz(folder / "ref128.npz", np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8))
    save_file(random_weights(1234), folder / "inception.safetensors")
    save_file(vq_weights(OmegaConf.load(ROOT / CONFIGS["llamagen"])), folder / "vq.safetensors")
    return folder


def family_args(family: str, inputs) -> list:
    return [f"--experiment.tokenizer_checkpoint={inputs / 'vq.safetensors'}"] if family == "llamagen" else []


def evaluating(inputs, *extra) -> list:
    return [f"--sample.fid_reference={inputs / 'ref.npz'}", f"--sample.inception_weights={inputs / 'inception.safetensors'}",
            "--sample.fid_method=eigh", *extra]


def sample(capsys, family: str, out, *args) -> tuple[int, str, str]:
    """The family's sampler in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        runner.main(["--config", CONFIGS[family], f"--experiment.output_dir={out}", *SMALL, *args], family)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def arr_0_bytes(npz) -> bytes:
    with zipfile.ZipFile(npz) as zf:
        return zf.read("arr_0.npy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inputs):
    """AliTok tiny, evaluated while sampling, kept as png, shards and none (and none with SoftCFG)."""
    folder = tmp_path_factory.mktemp("routes")
    made = {}
    for name, args in (("png", ["--sample.images=png"]), ("shards", ["--sample.images=shards"]),
                       ("none", ["--sample.images=none"]),
                       ("none_soft", ["--sample.images=none", "--model.generator.softcfg_strength=1"])):
        out = folder / name
        runner.main(["--config", CONFIGS["alitok"], f"--experiment.output_dir={out}", *SMALL, *args,
                     *evaluating(inputs, "--sample.bootstrap=10")], "alitok")
        made[name] = out
    return made


# ------------------------------------------------------------------------ the three routes
def test_png_shards_and_none_keep_what_they_say(runs):
    assert len(list(runs["png"].glob("*.png"))) == N and os.path.exists(f"{runs['png']}.npz")
    assert not list(runs["shards"].glob("*.png")) and os.path.exists(f"{runs['shards']}.npz")
    assert not list(runs["none"].glob("*.png")) and not os.path.exists(f"{runs['none']}.npz")
    for name in ("png", "shards", "none"):
        shards = sorted(p.name for p in (runs[name] / "shards").iterdir())
        assert shards == ["batch_000000.npz", "batch_000001.npz", "batch_000002.npz"]
        with np.load(shard_path(runs[name], 2)) as last:  # the short last batch: sample 4 only
            assert list(last["indices"]) == [4] and list(last["labels"]) == [4]
            assert last["tokens"].dtype == np.uint8 and last["tokens"].shape == (1, 273)  # codebook 64
            assert ("images" in last.files) == (name == "shards") and last["pool"].shape == (1, 2048)
        assert os.path.exists(f"{runs[name]}.metrics.json")
        manifest = json.loads((runs[name] / "manifest.json").read_text())
        assert manifest["recorded"]["sample.images"] == name and manifest["recorded"]["family"] == "alitok"
    tokens = {name: shard_arrays(runs[name], 3, ("tokens",))["tokens"] for name in ("png", "shards", "none")}
    assert np.array_equal(tokens["png"], tokens["shards"]) and np.array_equal(tokens["png"], tokens["none"])


@pytest.mark.parametrize("family", ["alitok", "rar", "llamagen"])
def test_the_shard_route_writes_the_png_route_s_npz_byte_for_byte(family, tmp_path, capsys, inputs):
    for images in ("png", "shards"):
        code, _, err = sample(capsys, family, tmp_path / images, f"--sample.images={images}",
                              *family_args(family, inputs))
        assert code == 0, err
    png, shards = tmp_path / "png.npz", tmp_path / "shards.npz"
    assert arr_0_bytes(png) == arr_0_bytes(shards)  # header and every pixel
    with np.load(png) as a, np.load(shards) as b:
        assert np.array_equal(a["labels"], b["labels"]) and a["arr_0"].shape[0] == N
    assert np.array_equal(shard_arrays(tmp_path / "png", 3, ("tokens",))["tokens"],
                          shard_arrays(tmp_path / "shards", 3, ("tokens",))["tokens"])


# ------------------------------------------------------------------------ metrics
METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


def assert_same_metrics(a: dict, b: dict, rel: float = 1e-6) -> None:
    for key in METRICS:
        assert math.isclose(a[key], b[key], rel_tol=rel, abs_tol=1e-9), (key, a[key], b[key])


def test_in_sampler_metrics_equal_the_evaluator_on_the_npz_and_on_the_folder(runs, inputs, tmp_path, capsys):
    stored = json.loads(open(f"{runs['shards']}.metrics.json").read())
    assert stored["settings"]["evaluated_while_sampling"] and stored["bootstrap"]["num_resamples"] == 10
    common = ["--inception-weights", str(inputs / "inception.safetensors"), "--fid-method", "eigh",
              "--bootstrap", "10", "--no-cache"]
    for target in (f"{runs['shards']}.npz", str(runs["none"])):
        json_path = tmp_path / "eval.json"
        assert evaluator.main([str(inputs / "ref.npz"), target, "--json", str(json_path), *common]) == 0
        result = json.loads(json_path.read_text())
        assert_same_metrics(result, stored)  # the npz: activations recomputed in batches of 64
        assert math.isclose(result["bootstrap"]["fid"]["std"], stored["bootstrap"]["fid"]["std"], rel_tol=1e-5)
    err = capsys.readouterr().err
    assert f"using the activations stored while sampling in {runs['none']}" in err
    for name in ("png", "none"):  # every route scores the same images the same
        assert_same_metrics(json.loads(open(f"{runs[name]}.metrics.json").read()), stored)


def test_compare_on_two_none_runs_equals_compare_on_their_npz_files(runs, inputs, tmp_path):
    npz = {name: decode_run(runs[name], tmp_path / f"{name}.npz") for name in ("none", "none_soft")}
    common = ["--inception-weights", str(inputs / "inception.safetensors"), "--bootstrap", "20", "--no-cache"]
    on_folders = compare.compare(compare.parse_args([str(inputs / "ref.npz"), str(runs["none"]),
                                                     str(runs["none_soft"]), *common]))
    on_files = compare.compare(compare.parse_args([str(inputs / "ref.npz"), str(npz["none"]),
                                                   str(npz["none_soft"]), *common]))
    assert on_folders["paired"] and on_folders["pairing"] == on_files["pairing"]
    for metric, d in on_files["metrics"].items():
        for key in ("a", "b", "delta", "std"):
            assert math.isclose(on_folders["metrics"][metric][key], d[key], rel_tol=1e-5, abs_tol=1e-6), (metric, key)
    assert on_folders["metrics"]["fid"]["delta"] != 0  # CFG and SoftCFG differ


def test_decode_tokens_rebuilds_the_images_of_a_run_that_kept_none(runs, tmp_path, capsys):
    script = ROOT / "scripts" / "decode_tokens.py"
    sys.argv = [str(script), str(runs["none"]), "--out", str(tmp_path / "rebuilt.npz")]
    import runpy
    runpy.run_path(str(script), run_name="__main__")
    assert f"wrote {tmp_path / 'rebuilt.npz'}" in capsys.readouterr().out
    with np.load(tmp_path / "rebuilt.npz") as rebuilt, np.load(f"{runs['png']}.npz") as png:
        assert_close_images(rebuilt["arr_0"], png["arr_0"])  # decoded in this process: within one level
        assert np.array_equal(rebuilt["labels"], png["labels"])
        assert json.loads(str(rebuilt["manifest"])) == json.loads((runs["none"] / "manifest.json").read_text())
    decode_run(runs["none"], png_dir=tmp_path / "pngs")
    from PIL import Image
    with np.load(tmp_path / "rebuilt.npz") as rebuilt:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / "000003.png")), rebuilt["arr_0"][3])
    with pytest.raises(Exception, match="already exists: pass --overwrite"):
        decode_run(runs["none"], tmp_path / "rebuilt.npz")


def test_decode_tokens_refuses_another_decoder_and_an_unfinished_run(runs, tmp_path):
    from softcfg_patch.errors import ConfigError
    with pytest.raises(ConfigError, match="is not the AliTok tokenizer checkpoint this run was sampled with"):
        decode_run(runs["none"], tmp_path / "x.npz", decoder=str(ROOT / "tests/fixtures/rar_tiny_weights.safetensors"))
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(runs["none"], broken)
    shard_path(broken, 1).unlink()
    with pytest.raises(ConfigError, match="unfinished: 1 of 3 shards"):
        decode_run(broken, tmp_path / "y.npz")
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()


# ------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("args,message", [
    (["--sample.images=none"], "sample.images=none keeps no images and computes no metrics"),
    (["--sample.fid_reference=nowhere/ref.npz"], "sample.fid_reference '.*nowhere/ref.npz' not found"),
    (["--sample.fid_reference={ref128}"], "holds 128x128 images but this model writes 256x256"),
    (["--sample.fid_reference={ref}", "--sample.inception_weights=nowhere.pth"],
     "needs the FID Inception weights: Inception weights not found"),
    (["--sample.fid_reference={ref}", "--sample.tokens_only=True"], "tokens_only=True decodes none"),
    (["--sample.bootstrap=100"], "sample.bootstrap is set but sample.fid_reference is not"),
    (["--sample.images=jpeg"], "sample.images must be one of png, shards, none"),
])
def test_bad_evaluation_inputs_exit_2_before_anything_is_sampled(args, message, tmp_path, capsys, inputs):
    args = [a.format(ref=inputs / "ref.npz", ref128=inputs / "ref128.npz") for a in args]
    code, out, err = sample(capsys, "alitok", tmp_path / "run", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and __import__("re").search(message, err), err
    assert "sampling" not in out and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ crashes and processes
KILLER = r'''
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
from softcfg_patch.run import runner
phase, argv = sys.argv[1], sys.argv[2:]
if phase == "shard":  # die inside the write of batch 1's shard, its temporary half written
    real = np.savez
    def savez(f, *a, **kw):
        if "batch_000001" in getattr(f, "name", ""):
            f.write(b"PK\x03\x04 half a shard"); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        return real(f, *a, **kw)
    np.savez = savez
else:  # die while <output_dir>.npz is being assembled
    real = np.lib.format.write_array_header_2_0
    def header(fp, d):
        real(fp, d); fp.write(b"\0" * 4096); os.kill(os.getpid(), signal.SIGKILL)
    np.lib.format.write_array_header_2_0 = header
runner.main(argv, "alitok")
'''


@pytest.mark.e2e
def test_kill_9_during_a_shard_write_and_during_assembly_then_a_rerun_gives_the_same_result(
        runs, inputs, tmp_path, capsys):
    out = tmp_path / "killed"
    argv = ["--config", CONFIGS["alitok"], f"--experiment.output_dir={out}", *SMALL, "--sample.images=shards",
            *evaluating(inputs, "--sample.bootstrap=10")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for phase in ("shard", "assembly"):
        proc = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT)), phase, *argv], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert not os.path.exists(f"{out}.npz") and not os.path.exists(f"{out}.metrics.json")
        if phase == "shard":
            assert shard_path(out, 0).is_file() and not shard_path(out, 1).exists()
            assert list((out / "shards").glob(".batch_000001.npz.*.tmp"))  # what the kill left
        else:
            assert all(shard_path(out, k).is_file() for k in range(3))
            assert list(tmp_path.glob(".killed.npz.*.tmp"))
    code, stdout, err = sample(capsys, "alitok", out, "--sample.images=shards",
                               *evaluating(inputs, "--sample.bootstrap=10"))
    assert code == 0 and "resuming: 3 of 3 batches" in stdout, err
    assert arr_0_bytes(f"{out}.npz") == arr_0_bytes(f"{runs['shards']}.npz")
    assert_same_metrics(json.loads(open(f"{out}.metrics.json").read()),  # batch 0 came from another process
                        json.loads(open(f"{runs['shards']}.metrics.json").read()))


def test_a_truncated_shard_is_drawn_again_whole(runs, inputs, tmp_path, capsys):
    import shutil
    out = tmp_path / "cut"
    shutil.copytree(runs["shards"], out)
    data = shard_path(out, 1).read_bytes()
    shard_path(out, 1).write_bytes(data[:len(data) // 2])  # as an interrupted copy would leave it
    code, stdout, err = sample(capsys, "alitok", out, "--sample.images=shards", *evaluating(inputs))
    assert code == 0 and "resuming: 2 of 3 batches" in stdout, err
    assert arr_0_bytes(f"{out}.npz") == arr_0_bytes(f"{runs['shards']}.npz")


@pytest.mark.e2e
def test_two_processes_store_the_shards_and_activations_of_one(runs, inputs, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "alitok" / "sample_imagenet.py"), "--config", CONFIGS["alitok"],
           f"--experiment.output_dir={out}", *SMALL, "--sample.images=shards",
           *evaluating(inputs, "--sample.bootstrap=10")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (shard_arrays(r, 3, ("tokens", "labels", "images", *ACTIVATIONS)) for r in (runs["shards"], out))
    assert np.array_equal(one["tokens"], two["tokens"]) and np.array_equal(one["labels"], two["labels"])
    assert_close_images(one["images"], two["images"])  # other processes: within one level
    for name in ACTIVATIONS:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-3, atol=1e-3)
    assert_same_metrics(json.loads(open(f"{out}.metrics.json").read()),
                        json.loads(open(f"{runs['shards']}.metrics.json").read()), rel=1e-4)
