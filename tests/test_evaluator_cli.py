"""The evaluator command line (python evaluations/evaluator.py REF SAMPLE) and the npz streaming reader."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import evaluator as E
from evaluations import metrics as M
from evaluations.inception import FIDInception
from evaluations.npz import BatchFileError, NpzImages
from test_inception import RECIPE, recipe_state_dict
from test_run_manifest import unprivileged

ROOT = Path(__file__).resolve().parents[1]
ADM_PROGRESS = ["computing reference batch activations...", "computing/reading reference batch statistics...",
                "computing sample batch activations...", "computing/reading sample batch statistics...",
                "Computing evaluations..."]
LABELS = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
KEYS = ["inception_score", "fid", "sfid", "precision", "recall"]


def _images(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Blocky random colour images (8x8-pixel tiles), uint8 [n, size, size, 3]."""
    tiles = np.random.default_rng(seed).integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    return tiles.repeat(8, axis=1).repeat(8, axis=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in recipe_state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("batches")
    np.savez(folder / "ref.npz", _images(4, seed=1))
    np.savez_compressed(folder / "sample.npz", _images(4, seed=2), np.arange(4))  # + labels, as ADM samplers
    return folder / "ref.npz", folder / "sample.npz"


@pytest.fixture(scope="module")
def script_run(weights, batches):
    """One real run as a script from the repository root (network, cache, metrics, JSON)."""
    ref, sample = batches
    out = ref.parent / "out.json"
    cmd = [sys.executable, "evaluations/evaluator.py", str(ref), str(sample), "--inception-weights", str(weights),
           "--json", str(out), "--fid-method", "eigh", "--batch-size", "3", "--device", "cpu"]
    # the thread count of this process (conftest), whatever OMP_NUM_THREADS says: conv sums
    # split over another number of threads differ by ~1e-5, and the features are compared below
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _main(capsys, *args) -> tuple[int, str, str]:
    rc = E.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------- end to end

@pytest.mark.e2e
def test_script_prints_adm_lines_and_writes_json(script_run, batches):
    proc, written = script_run
    lines = proc.stdout.strip().splitlines()
    assert lines[:5] == ADM_PROGRESS
    assert [line.split(": ")[0] for line in lines[-5:]] == LABELS
    for line, key in zip(lines[-5:], KEYS):  # the printed text is Python's repr of the JSON value
        assert line.split(": ")[1] == repr(written[key])
    settings = written["settings"]
    assert settings["inception_sha256"] == RECIPE["sha256_472_float_keys"]
    assert (settings["num_ref"], settings["num_samples"], settings["cache_hit"]) == (4, 4, False)
    assert settings["ref_stats"].startswith("computed from the reference images")
    assert (settings["resize"], settings["distance"], settings["fid_method"]) == ("tf1", "fp16", "eigh")
    assert Path(settings["activation_cache"]).parent == batches[0].parent


def test_script_results_equal_the_api_on_the_same_features(script_run, weights, batches):
    _, written = script_run
    ref_path, sample_path = batches
    with np.load(written["settings"]["activation_cache"]) as cache:
        ref = {"pool": cache["pool"], "spatial": cache["spatial"]}
    model = FIDInception(weights)
    with torch.inference_mode():
        first_ref = model(np.load(ref_path)["arr_0"][:1])  # the cache holds the network's features
        sample = {k: v.numpy() for k, v in model(np.load(sample_path)["arr_0"]).items()}
    # conv features do not depend on the batch size (the CLI ran batches of 3); logits move ~1e-6
    np.testing.assert_allclose(ref["pool"][:1], first_ref["pool"].numpy(), atol=1e-5)
    np.testing.assert_allclose(ref["spatial"][:1], first_ref["spatial"].numpy(), atol=1e-5)
    expected = M.compute_all(ref, sample, fid_method="eigh", device="cpu")
    for key in KEYS:
        assert written[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


# ----------------------------------------------------------------------------- cache and statistics

class _Recorder:
    """Stands in for the network and the metric math, so plumbing tests run in milliseconds."""

    def __init__(self):
        self.activation_calls, self.compute_all_args = [], None

    def compute_activations(self, model, images, *, batch_size, limit=None, num_workers=0, desc="",
                            keys=("pool", "spatial", "logits")):
        self.activation_calls.append((images.path.name, tuple(keys)))
        n = len(images) if limit is None else limit
        dims = {"pool": 2048, "spatial": 2023, "logits": 1008}
        return {k: np.full((n, dims[k]), 0.5, dtype=np.float32) for k in keys}

    def compute_all(self, ref, sample, **kwargs):
        self.compute_all_args = (ref, sample, kwargs)
        return dict(zip(KEYS, [1.5, 2.5, 3.5, 0.75, 0.25]))


@pytest.fixture()
def recorder(monkeypatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(E, "compute_activations", rec.compute_activations)
    monkeypatch.setattr(E.metrics, "compute_all", rec.compute_all)
    return rec


def test_reference_activations_come_from_the_cache(script_run, weights, batches, recorder, capsys, tmp_path):
    _, first = script_run
    out = tmp_path / "again.json"
    rc, stdout, stderr = _main(capsys, *batches, "--inception-weights", weights, "--json", out)
    assert rc == 0 and "using cached reference activations" in stderr and "using cached sample activations" in stderr
    fake = [1.5, 2.5, 3.5, 0.75, 0.25]
    assert stdout.strip().splitlines()[-5:] == [f"{label}: {v}" for label, v in zip(LABELS, fake)]
    assert recorder.activation_calls == []  # neither the reference nor the samples went through the network
    with np.load(first["settings"]["activation_cache"]) as cache:
        assert np.array_equal(recorder.compute_all_args[0]["pool"], cache["pool"])
    with np.load(first["settings"]["sample_activation_cache"]) as cache:
        assert np.array_equal(recorder.compute_all_args[1]["logits"], cache["logits"])
    settings = json.loads(out.read_text())["settings"]
    assert settings["cache_hit"] is True and settings["sample_cache_hit"] is True
    assert settings["sample_sha256"] == E.file_sha256(batches[1])


def test_network_identity_is_hashed_once_per_evaluation(weights, batches, recorder, capsys, monkeypatch, tmp_path):
    from evaluations import inception as I
    hashed, real = [], I._weights_sha256
    monkeypatch.setattr(I, "_weights_sha256", lambda state: hashed.append(1) or real(state))
    ref, sample = (Path(shutil.copy(p, tmp_path)) for p in batches)  # fresh caches, away from the shared files
    out = tmp_path / "out.json"
    rc, _, stderr = _main(capsys, ref, sample, "--inception-weights", weights, "--json", out)
    assert rc == 0, stderr
    assert len(hashed) == 1  # not once per cache key (reference, sample) and again for the JSON
    assert json.loads(out.read_text())["settings"]["inception_sha256"] == RECIPE["sha256_472_float_keys"]
    assert len(list(tmp_path.glob("*.fid-inception-*.npz"))) == 2
    model = FIDInception(weights)  # a new state dict is hashed anew
    before = model.identity()
    I.load_state_dict_strict(model, {k: v + 1 if k == "fc.bias" else v for k, v in model.state_dict().items()})
    assert model.identity() != before and len(hashed) == 3


@pytest.fixture(scope="module")
def network(weights) -> FIDInception:
    return FIDInception(weights)


@pytest.fixture()
def loaded_once(network, weights, monkeypatch):
    """The network built once per module instead of once per in-process run."""
    monkeypatch.setattr(E, "load_network", lambda args, device: (network, weights, "0" * 64))


def test_sample_cache_is_keyed_by_the_file_bytes(script_run, weights, batches, recorder, capsys, tmp_path,
                                                 loaded_once):
    sample = tmp_path / "sample.npz"
    np.savez(sample, _images(5, seed=9))
    rc, _, _ = _main(capsys, batches[0], sample, "--inception-weights", weights, "--num-samples", "4")
    assert rc == 0 and recorder.activation_calls == [("sample.npz", ("pool", "spatial", "logits"))]
    rc, _, stderr = _main(capsys, batches[0], sample, "--inception-weights", weights, "--num-samples", "4")
    assert rc == 0 and len(recorder.activation_calls) == 1 and "using cached sample activations" in stderr
    np.savez(sample, _images(5, seed=10))  # same name, other images: the old cache must not be used
    rc, _, _ = _main(capsys, batches[0], sample, "--inception-weights", weights, "--num-samples", "5")
    assert rc == 0 and len(recorder.activation_calls) == 2 and recorder.compute_all_args[1]["pool"].shape[0] == 5
    assert len(list(tmp_path.glob("sample.fid-inception-*.npz"))) == 2


def test_bootstrap_lines_and_json(script_run, weights, batches, recorder, capsys, tmp_path, loaded_once):
    out = tmp_path / "boot.json"
    rc, stdout, _ = _main(capsys, *batches, "--inception-weights", weights, "--json", out, "--bootstrap", "20")
    assert rc == 0
    lines = stdout.strip().splitlines()
    assert lines[-9:-4] == [f"{label}: {v}" for label, v in zip(LABELS, [1.5, 2.5, 3.5, 0.75, 0.25])]
    assert lines[-4] == "bootstrap over 20 resamples (seed 0):"
    boot = json.loads(out.read_text())["bootstrap"]
    assert boot["num_resamples"] == 20 and "1.96" in boot["interval"]
    for line, (label, key) in zip(lines[-3:], [("Inception Score", "inception_score"), ("FID", "fid"),
                                                ("sFID", "sfid")]):
        d = boot[key]
        m = re.fullmatch(rf"{label}: ([\d.]+) ± ([\d.]+) \(95% CI ([\d.-]+)-([\d.]+)\)", line)
        assert m, line
        assert d["value"] == dict(zip(KEYS, [1.5, 2.5, 3.5]))[key]  # centred on the ADM number printed above
        assert d["ci_high"] - d["value"] == pytest.approx(1.959964 * d["std"]) and d["std"] > 0
        assert float(m.group(2)) == pytest.approx(d["std"], abs=1e-2)
    # the std is the metrics module's, on the cached activations
    with np.load(json.loads(out.read_text())["settings"]["sample_activation_cache"]) as cache:
        sample = {k: cache[k] for k in ("pool", "spatial", "logits")}
    expected = M.bootstrap(recorder.compute_all_args[0], sample, 20, 0, device="cpu")
    assert boot["fid"]["std"] == pytest.approx(expected["fid"]["std"], rel=1e-9)


def test_warnings_for_small_n_and_unpublished_weights(script_run):
    proc, _ = script_run
    assert "warning: scoring 4 samples: FID is biased at this N; ADM reports use 50,000" in proc.stderr
    assert "is not the published FID Inception file" in proc.stderr and "not comparable" in proc.stderr


def test_cache_key_names_file_and_network(weights, batches):
    model = FIDInception(weights)
    key = E._cache_key("a" * 64, model)
    assert key != E._cache_key("b" * 64, model)
    model.resize = "torch"
    assert key != E._cache_key("a" * 64, model)
    assert E.cache_path(batches[0], key).name == f"ref.fid-inception-{key[:16]}.npz"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(path: Path, pid: int, age_s: float = 3600) -> Path:
    """A write-then-rename temporary of `pid`, last written `age_s` seconds ago."""
    tmp = path.with_name(f".{path.name}.{pid}.tmp")
    tmp.write_bytes(b"half a file")
    os.utime(tmp, (time.time() - age_s, time.time() - age_s))
    return tmp


@pytest.mark.e2e
def test_damaged_cache_is_recomputed_and_rewritten(weights, batches, recorder, capsys, tmp_path):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(batches[0].read_bytes())
    key = E._cache_key(E.file_sha256(ref), FIDInception(weights))
    E.cache_path(ref, key).write_bytes(b"not an npz")
    stale = _leftover(E.cache_path(ref, key), _dead_pid())  # a run killed while writing
    running = _leftover(E.cache_path(ref, key), os.getppid())  # a live process's: kept
    fresh = _leftover(E.cache_path(ref, key), _dead_pid(), age_s=1)  # maybe another host's writer: kept
    rc, _, stderr = _main(capsys, ref, batches[1], "--inception-weights", weights)
    assert rc == 0 and "ignoring unreadable cache" in stderr
    assert recorder.activation_calls[0] == ("ref.npz", ("pool", "spatial"))
    with np.load(E.cache_path(ref, key)) as cache:  # rewritten whole (atomic rename)
        assert str(cache["key"]) == key and cache["pool"].shape == (4, 2048)
    assert not stale.exists() and running.exists() and fresh.exists()
    running.unlink()
    fresh.unlink()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.e2e
def test_sampler_npz_write_removes_a_killed_runs_temporary(tmp_path):
    from softcfg_patch.files import atomic_write, save_npz
    npz = tmp_path / "run.npz"
    stale = _leftover(npz, _dead_pid())  # what kill -9 during the npz write leaves
    png = tmp_path / "000001.png"
    stale_png = _leftover(png, _dead_pid())
    atomic_write(png, lambda tmp: tmp.write_bytes(b"png"))
    assert stale.exists() and stale_png.exists()  # PNG writes do not scan the folder (50k of them)
    save_npz(npz, np.zeros(3))
    assert not stale.exists() and npz.is_file()


def test_precomputed_reference_statistics_are_used_unless_recompute(weights, batches, recorder, capsys, tmp_path):
    ref = tmp_path / "ref_with_stats.npz"
    mu, mu_s = np.linspace(0, 1, 2048, dtype=np.float32), np.linspace(0, 1, 2023, dtype=np.float32)
    np.savez(ref, _images(5, seed=1), mu=mu, sigma=np.eye(2048), mu_s=mu_s, sigma_s=np.eye(2023))
    rc, _, _ = _main(capsys, ref, batches[1], "--inception-weights", weights, "--no-cache",
                     "--json", tmp_path / "a.json")
    assert rc == 0
    assert np.array_equal(recorder.compute_all_args[0]["mu"], mu)
    assert np.array_equal(recorder.compute_all_args[0]["mu_s"], mu_s)
    assert "precomputed" in json.loads((tmp_path / "a.json").read_text())["settings"]["ref_stats"]
    rc, _, _ = _main(capsys, ref, batches[1], "--inception-weights", weights, "--no-cache", "--recompute-ref-stats")
    assert rc == 0 and "mu" not in recorder.compute_all_args[0]
    assert not list(tmp_path.glob("*fid-inception*"))  # --no-cache writes nothing


# ----------------------------------------------------------------------------- bad input

def _bad_input_cases(tmp: Path, sample: Path) -> list[tuple[list, str]]:
    def save(name, *arrays, **named):
        np.savez(tmp / name, *arrays, **named)
        return tmp / name

    def compressed(name, images):
        np.savez_compressed(tmp / name, images)
        return tmp / name

    def corrupt(path, offset):  # offset from the start (>= 0) or the end of arr_0's data (< 0)
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("arr_0.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        data[start + offset if offset >= 0 else start + info.compress_size + offset] ^= 0xFF
        path.write_bytes(bytes(data))
        return path

    (tmp / "text.npz").write_text("hello")
    return [
        ([save("no_arr0.npz", images=_images(4)), sample], r"no 'arr_0' array \(found keys: \['images'\]\)"),
        ([save("float.npz", _images(4).astype(np.float32) / 255), sample], "dtype float32, expected uint8"),
        ([save("gray.npz", _images(4)[..., 0]), sample], r"shape \(4, 256, 256\), expected \[N, H, W, 3\]"),
        ([save("nchw.npz", _images(4).transpose(0, 3, 1, 2)), sample], r"expected \[N, H, W, 3\]"),
        ([save("small.npz", _images(4, size=64)), sample], "images are 64x64, expected 256x256; pass --image-size 64"),
        ([save("three.npz", _images(3)), sample], "has 3 images; precision/recall .* at least 4"),
        ([tmp / "text.npz", sample], "is not an .npz"),
        ([tmp / "missing.npz", sample], "reference file not found"),
        ([save("ok.npz", _images(4)), sample, "--num-samples", "10"], "holds 4 images, fewer than --num-samples 10"),
        ([save("half_stats.npz", _images(4), mu=np.zeros(2048), sigma=np.eye(3)), sample],
         "lacks 'mu_s'/'sigma_s'; store all four"),
        ([tmp / "ok.npz", sample, "--inception-weights", tmp / "nope.pth"],
         "nope.pth.*pt_inception-2015-12-05-6726825d.pth.*github.com/mseitzer/pytorch-fid/releases"),
        ([tmp / "ok.npz", sample, "--json", tmp / "no_dir" / "out.json"], "no_dir does not exist"),
        ([tmp / "ok.npz", sample, "--json", tmp / "text.npz" / "out.json"], "text.npz is a file, not a folder"),
        ([tmp / "ok.npz", sample, "--device", "tpu9"], "--device"),
        # a flipped byte in a row that --num-samples does not even read: the whole member's CRC is checked
        ([tmp / "ok.npz", corrupt(save("stored.npz", _images(6), labels=np.arange(6)), -4000), "--num-samples", "4"],
         r"sample file .*stored.npz' is corrupt: member arr_0.npy fails its CRC-32 check"),
        ([corrupt(save("ref_bad.npz", _images(5)), -10), sample], r"reference file .*ref_bad.npz' is corrupt"),
        ([tmp / "ok.npz", corrupt(compressed("deflated.npz", _images(6)), 3000), "--num-samples", "4"],
         r"deflated.npz' is corrupt"),
    ]


def test_bad_inputs_exit_2_with_a_reason_and_no_result(tmp_path, batches, capsys):
    for args, message in _bad_input_cases(tmp_path, batches[1]):
        rc, stdout, stderr = _main(capsys, *args)
        assert rc == 2, (args, stderr)
        assert stderr.startswith("error: ") and re.search(message, stderr), (message, stderr)
        assert stderr.count("\n") == 1, stderr  # one line
        assert not any(stdout.startswith(label) or f"\n{label}:" in stdout for label in LABELS), stdout


def test_json_path_that_is_a_folder_is_refused_before_any_work(batches, weights, recorder, capsys, tmp_path):
    rc, stdout, stderr = _main(capsys, *batches, "--inception-weights", weights, "--json", tmp_path)
    assert rc == 2 and stderr.startswith(f"error: --json {tmp_path} is a folder") and stderr.count("\n") == 1, stderr
    assert "results.json" in stderr  # says what to pass instead
    assert stdout == "" and recorder.activation_calls == []


def test_json_folder_on_a_read_only_file_system_is_refused(batches, recorder, capsys, tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    rc, stdout, stderr = _main(capsys, *batches, "--json", tmp_path / "out.json")
    assert rc == 2 and stderr.count("\n") == 1, stderr
    assert f"folder {tmp_path} is not writable (Read-only file system)" in stderr and stdout == ""
    assert recorder.activation_calls == []


@pytest.mark.e2e
def test_unwritable_json_target_is_refused_before_any_image_is_read(batches, weights, tmp_path):
    """As a user without the capabilities that ignore file permissions (CI runs as root): an
    unwritable folder, and an existing read-only file, are refused in one line before the
    network is run; no activation cache is written next to the batches."""
    ref, sample = (Path(shutil.copy(p, tmp_path)) for p in batches)  # fresh: no cache next to them
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "old.json").chmod(0o444)
    ro.chmod(0o555)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        probe = subprocess.run(unprivileged([sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"]),
                               env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, "the folder must really be read-only"
        for target, message in ((ro / "out.json", f"folder {ro} is not writable (Permission denied)"),
                                (tmp_path / "old.json", "is not writable (Permission denied)")):
            cmd = [sys.executable, "evaluations/evaluator.py", str(ref), str(sample), "--inception-weights",
                   str(weights), "--json", str(target), "--device", "cpu"]
            proc = subprocess.run(unprivileged(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert proc.stderr.startswith(f"error: --json {target}") and message in proc.stderr, proc.stderr
            assert proc.stderr.count("\n") == 1 and "computing" not in proc.stdout, proc.stdout
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == [] and not list(tmp_path.glob("*.fid-inception-*"))
    assert (tmp_path / "old.json").read_text() == "{}"


def test_json_write_failure_at_the_end_keeps_the_printed_results(batches, weights, recorder, loaded_once, capsys,
                                                                  tmp_path, monkeypatch):
    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "atomic_write", full_disk)
    rc, stdout, stderr = _main(capsys, *batches, "--inception-weights", weights, "--json", tmp_path / "out.json")
    assert rc == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [stderr.splitlines()[-1]], stderr  # one line, after the warnings of the run
    assert errors[0].startswith(f"error: could not write --json {tmp_path / 'out.json'} (No space left on device)")
    assert stdout.strip().splitlines()[-5:] == [f"{label}: {v}" for label, v in zip(LABELS, [1.5, 2.5, 3.5, 0.75,
                                                                                              0.25])]


class _NaNNetwork(torch.nn.Module):
    """A network whose third image comes out as NaN (what broken weights or fp16 overflow give)."""
    resize, normalize = "tf1", "adm"

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, images):
        pool = torch.ones(len(images), 2048)
        pool[images[:, 0, 0, 0] == 99] = float("nan")
        return {"pool": pool, "spatial": torch.ones(len(images), 2023), "logits": torch.zeros(len(images), 1008)}

    def identity(self) -> str:
        return "nan-network"


def test_nan_features_are_an_error(weights, batches, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(E, "FIDInception", _NaNNetwork)
    images = _images(5)
    images[2, 0, 0, 0] = 99
    np.savez(tmp_path / "nan.npz", images)
    rc, stdout, stderr = _main(capsys, tmp_path / "nan.npz", batches[1], "--inception-weights", weights,
                               "--batch-size", "2", "--no-cache")
    assert rc == 2 and "NaN/inf 'pool' features for images 2..3 of" in stderr and "--inception-weights" in stderr
    assert "FID" not in stdout


def test_bad_option_values_are_rejected(capsys):
    with pytest.raises(SystemExit) as err:
        E.main(["a.npz", "b.npz", "--batch-size", "0"])
    assert err.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        E.main(["a.npz", "b.npz", "--bootstrap", "5"])
    assert err.value.code == 2 and "--bootstrap must be 0 (off) or >= 10 resamples, got 5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- npz streaming

@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed])
def test_streaming_reader_returns_the_rows_in_batches(tmp_path, saver):
    images = _images(7, size=16, seed=3)
    saver(tmp_path / "x.npz", images, np.arange(7), mu=np.zeros(3))
    with NpzImages(tmp_path / "x.npz", image_size=16) as reader:
        assert len(reader) == 7 and reader.shape == (7, 16, 16, 3)
        parts = list(reader.batches(3))
        assert [len(p) for p in parts] == [3, 3, 1] and parts[0].flags.writeable
        assert np.array_equal(np.concatenate(parts), images)
        assert np.array_equal(np.concatenate(list(reader.batches(2, limit=5))), images[:5])
        assert list(reader.read_stats()) == ["mu"]
        with pytest.raises(BatchFileError, match="holds 7 images, fewer than the 8"):
            next(reader.batches(2, limit=8))


def _write_member(path: Path, header_shape: tuple, rows: np.ndarray, version: tuple = (1, 0)) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": "|u1", "fortran_order": False, "shape": header_shape}
            (np.lib.format.write_array_header_1_0 if version == (1, 0)
             else np.lib.format.write_array_header_2_0)(member, header)
            member.write(rows.tobytes())


def test_streaming_never_loads_the_whole_array(tmp_path):
    # The header promises a million 256x256 images (196 GB); only three rows exist. Reading the
    # first batches works, so nothing tried to load arr_0 whole; reading past the data is an error.
    rows = _images(3, seed=4)
    _write_member(tmp_path / "huge.npz", (1_000_000, 256, 256, 3), rows)
    with NpzImages(tmp_path / "huge.npz") as reader:
        assert len(reader) == 1_000_000
        batches = reader.batches(2, limit=1_000_000)
        assert np.array_equal(next(batches), rows[:2])
        with pytest.raises(BatchFileError, match="truncated: arr_0 ends at row 3"):
            next(batches)


def test_streaming_reads_npy_v2_headers_and_fortran_order(tmp_path):
    rows = _images(4, size=32, seed=5)
    _write_member(tmp_path / "v2.npz", (4, 32, 32, 3), rows, version=(2, 0))  # as the sampler writes
    with NpzImages(tmp_path / "v2.npz", image_size=32) as reader:
        assert np.array_equal(np.concatenate(list(reader.batches(3))), rows)
    np.savez(tmp_path / "f.npz", np.asfortranarray(rows))
    with pytest.warns(UserWarning, match="Fortran order"):
        reader = NpzImages(tmp_path / "f.npz", image_size=32)
    with reader:
        assert np.array_equal(np.concatenate(list(reader.batches(3))), rows)


def _cut(path: Path, keep: int) -> Path:
    """The first `keep` bytes of `path`, as an interrupted copy leaves them."""
    cut = path.with_name(f"cut_{keep}_{path.name}")
    cut.write_bytes(path.read_bytes()[:keep])
    return cut


class _Pipe:
    """A write-only stream (no seek): zipfile then puts each member's sizes in a data descriptor."""

    def __init__(self):
        self.data = bytearray()

    def write(self, b) -> int:
        self.data += b
        return len(b)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed])
def test_truncated_npz_says_where_it_ends(tmp_path, saver):
    saver(tmp_path / "x.npz", _images(6, size=16, seed=6), np.arange(6))
    with zipfile.ZipFile(tmp_path / "x.npz") as zf:
        info = zf.getinfo("arr_0.npy")
    size = (tmp_path / "x.npz").stat().st_size
    half = _cut(tmp_path / "x.npz", size // 2)
    with pytest.raises(BatchFileError) as err:
        NpzImages(half, image_size=16, role="sample")
    text = str(err.value)
    assert text.startswith(f"sample file '{half}' looks truncated: its {size // 2:,} bytes end inside member "
                           f"arr_0.npy, which needs {info.compress_size:,} bytes of data"), text
    assert "not an .npz" not in text and "end record is missing" in text and "copy or write it again" in text
    assert "\n" not in text
    no_end = _cut(tmp_path / "x.npz", size - 10)  # every member whole, the zip's directory cut off
    with pytest.raises(BatchFileError, match=rf"its {size - 10:,} bytes hold all 2 members \(arr_0.npy, "
                                             rf"arr_1.npy\) but the zip's end record is missing"):
        NpzImages(no_end, image_size=16)


def test_truncated_npz_with_sizes_in_a_data_descriptor(tmp_path):
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w") as zf:
        with zf.open("arr_0.npy", "w") as member:
            np.lib.format.write_array(member, _images(4, size=16))
    with zipfile.ZipFile(io.BytesIO(bytes(pipe.data))) as zf:
        assert zf.getinfo("arr_0.npy").flag_bits & 0x08  # the case: sizes after the data
    (tmp_path / "piped.npz").write_bytes(bytes(pipe.data[:len(pipe.data) // 2]))
    with pytest.raises(BatchFileError) as err:
        NpzImages(tmp_path / "piped.npz", image_size=16)
    text = str(err.value)
    assert f"looks truncated: its {len(pipe.data) // 2:,} bytes" in text and "end record is missing" in text
    assert "data descriptor" in text and "copy or write it again" in text and "needs" not in text


def test_a_file_that_is_not_a_zip_keeps_the_savez_advice(tmp_path):
    (tmp_path / "png.npz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(BatchFileError, match=r"is not an .npz \(zip\) file .*np.savez\(path, images\)") as err:
        NpzImages(tmp_path / "png.npz")
    assert "truncated" not in str(err.value)


def test_prefetch_keeps_order_and_reraises():
    assert list(E.prefetch(iter(range(20)), depth=3)) == list(range(20))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(E.prefetch(broken(), depth=2))
