"""evaluations/compare.py: paired CFG-vs-SoftCFG comparisons, refusing unpaired inputs.

The Inception network is replaced by a fixed random projection of the pixels (the network itself
is tested in test_inception.py / test_evaluator_cli.py), so each run takes milliseconds."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from evaluations import compare as C
from evaluations import evaluator as E
from evaluations import metrics as M
from test_run_manifest import unprivileged

ROOT = Path(__file__).resolve().parents[1]

SIZE, N = 8, 48
DIMS = {"pool": 2048, "spatial": 2023, "logits": 1008}
PROJECTION = {k: np.random.default_rng(i).normal(size=(SIZE * SIZE * 3, d)).astype(np.float32) / 40
              for i, (k, d) in enumerate(DIMS.items())}


class _Network:
    resize, normalize = "tf1", "adm"

    def identity(self) -> str:
        return "projection"


def project(images: np.ndarray, keys=tuple(DIMS)) -> dict:
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    return {k: x @ PROJECTION[k] for k in keys}


@pytest.fixture(autouse=True)
def fake_network(monkeypatch):
    calls = []

    def activations(model, images, *, batch_size, limit=None, num_workers=0, desc="", keys=tuple(DIMS)):
        calls.append(images.path.name)
        return project(np.concatenate(list(images.batches(batch_size, limit))), keys)

    monkeypatch.setattr(E, "compute_activations", activations)
    monkeypatch.setattr(E, "load_network", lambda args, device: (_Network(), Path("projection.pth"), "0" * 64))
    return calls


def images(seed: int, n: int = N, shift: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 200, (n, SIZE, SIZE, 3))
    return np.clip(x + shift, 0, 255).astype(np.uint8)


def manifest(seed: int = 0, batch: int = 16, scale: float = 3.0) -> np.ndarray:
    """The samplers' manifest (contract with the sampler): a 0-d unicode array holding JSON."""
    return np.array(json.dumps({"format": 1, "images": {
        "sample.seed": seed, "sample.per_proc_batch_size": batch, "sample.num_fid_samples": N,
        "model.generator.guidance_scale": scale}, "recorded": {"torch": "2.13.0"}}))


def save(path: Path, arr: np.ndarray, labels=None, man=None) -> Path:
    extras = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
    if man is not None:
        extras["manifest"] = man
    np.savez(path, arr, **extras)
    return path


@pytest.fixture()
def files(tmp_path) -> dict:
    base = images(1)
    labels = np.arange(N) % 10
    return {
        "ref": save(tmp_path / "ref.npz", images(0, 200)),
        "a": save(tmp_path / "a.npz", base, labels, manifest(scale=3.0)),
        # B: the same rows with a planted brightness shift (paired noise, one real difference)
        "b": save(tmp_path / "b.npz", images(1, shift=30), labels, manifest(scale=5.0)),
        "labels": labels, "tmp": tmp_path,
    }


def run(capsys, *args) -> tuple[int, str, str]:
    rc = C.main([str(a) for a in args] + ["--image-size", "0", "--device", "cpu"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_paired_comparison_finds_the_planted_difference(files, capsys, fake_network, monkeypatch):
    out_json = files["tmp"] / "cmp.json"
    rc, stdout, stderr = run(capsys, files["ref"], files["a"], files["b"], "--bootstrap", "50", "--json", out_json)
    assert rc == 0, stderr
    result = json.loads(out_json.read_text())
    assert result["paired"] and "sample.seed=0, sample.per_proc_batch_size=16" in result["pairing"]
    fid = result["metrics"]["fid"]
    ref = project(images(0, 200), ("pool",))["pool"]
    expected = [M.frechet_distance(*M.statistics(project(x, ("pool",))["pool"]), *M.statistics(ref), method="eigh")
                for x in (images(1), images(1, shift=30))]
    assert (fid["a"], fid["b"]) == pytest.approx(expected, rel=1e-9)
    assert fid["delta"] > 0 and fid["ci_low"] > 0 and fid["p_value"] < 0.05
    assert fid["std"] < np.hypot(fid["a_std"], fid["b_std"]) / 2  # pairing cancels the shared noise
    assert result["verdicts"]["fid"].startswith("A is better than B (p = ")
    assert "FID: A is better than B" in stdout and re.search(r"^FID +[\d.]+ ± [\d.]+ +[\d.]+ ± ", stdout, re.M)
    assert set(result["metrics"]) == {"fid", "sfid", "inception_score"}
    # the activations were cached next to each file: a second comparison computes none
    fake_network.clear()
    monkeypatch.setattr(C.metrics, "paired_bootstrap", lambda ref, a, b, *args, **kw: {"fid": fid})  # skip the math
    assert run(capsys, files["ref"], files["a"], files["b"], "--bootstrap", "10")[0] == 0 and fake_network == []


def test_verdict_wording():
    same = {"delta": -0.01, "p_value": 0.4}
    assert C.verdict("fid", same, 0.05) == "no detectable difference at this N (p = 0.4)"
    assert C.verdict("fid", {"delta": -0.1, "p_value": 0.003}, 0.05) == "B is better than A (p = 0.003)"
    assert C.verdict("inception_score", {"delta": -3.0, "p_value": 0.01}, 0.05) == "A is better than B (p = 0.01)"


def test_unpaired_inputs_are_refused_in_one_line(files, capsys):
    tmp, labels = files["tmp"], files["labels"]
    cases = [
        (save(tmp / "seed1.npz", images(1), labels, manifest(seed=1)), r"sample.seed 0 \(A\) vs 1 \(B\)"),
        (save(tmp / "batch8.npz", images(1), labels, manifest(batch=8)), r"sample.per_proc_batch_size 16 \(A\) vs 8"),
        (save(tmp / "labels.npz", images(1), labels[::-1], manifest()), "the labels differ"),
        (save(tmp / "adm.npz", images(1)), r"B \('.*adm.npz'\) carry no sampling manifest .*pass --unpaired"),
        (save(tmp / "short.npz", images(1, n=N - 1), labels[:-1], manifest()), "A holds 48 images and B 47"),
    ]
    for b, message in cases:
        rc, stdout, stderr = run(capsys, files["ref"], files["a"], b, "--bootstrap", "10")
        assert rc == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert re.search(message, stderr), (message, stderr)
        assert stdout == ""


def test_unpaired_flag_compares_independent_sets(files, capsys):
    adm_style = save(files["tmp"] / "adm.npz", images(1, shift=30))  # arr_0 only: old-style files still work
    out_json = files["tmp"] / "u.json"
    rc, stdout, _ = run(capsys, files["ref"], files["a"], adm_style, "--unpaired", "--bootstrap", "20",
                        "--json", out_json)
    assert rc == 0 and "unpaired (independent bootstraps)" in stdout
    fid = json.loads(out_json.read_text())["metrics"]["fid"]
    assert fid["std"] == pytest.approx(np.hypot(fid["a_std"], fid["b_std"]))


def test_corrupt_file_is_an_error_before_any_number(files, capsys):
    path = files["b"]
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size - 5] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, stdout, stderr = run(capsys, files["ref"], files["a"], path, "--num-samples", "10", "--bootstrap", "10")
    assert rc == 2 and "fails its CRC-32 check" in stderr and stdout == ""


def test_bad_options(capsys):
    for args, message in ((["--bootstrap", "5"], "--bootstrap must be >= 10"), (["--alpha", "2"], "--alpha")):
        with pytest.raises(SystemExit) as err:
            C.main(["r.npz", "a.npz", "b.npz", *args])
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_same_file_twice_warns_and_goes_on(files, capsys):
    copy = Path(shutil.copy(files["a"], files["tmp"] / "a_copy.npz"))  # other path, same bytes
    sha = E.file_sha256(files["a"])
    for b in (files["a"], copy):
        rc, stdout, stderr = run(capsys, files["ref"], files["a"], b, "--bootstrap", "10")
        assert rc == 0, stderr
        warnings = [line for line in stderr.splitlines() if "same file" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: A and B are the same file"), stderr
        assert sha[:12] in warnings[0] and str(b) in warnings[0]
        assert "FID: no detectable difference at this N (p = 1)" in stdout  # and it went on
    rc, _, stderr = run(capsys, files["ref"], files["a"], files["b"], "--bootstrap", "10")
    assert rc == 0 and "same file" not in stderr


def test_json_path_that_is_a_folder_is_refused_before_any_work(files, capsys, fake_network):
    rc, stdout, stderr = run(capsys, files["ref"], files["a"], files["b"], "--bootstrap", "10",
                             "--json", files["tmp"])
    assert rc == 2 and stderr.startswith(f"error: --json {files['tmp']} is a folder"), stderr
    assert stderr.count("\n") == 1 and stdout == "" and fake_network == []


@pytest.mark.e2e
def test_unwritable_json_folder_is_refused_before_any_image_is_read(files):
    ro = files["tmp"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "evaluations/compare.py", str(files["ref"]), str(files["a"]), str(files["b"]),
           "--json", str(ro / "cmp.json"), "--inception-weights", str(files["tmp"] / "no_such.pth"),
           "--image-size", "0", "--device", "cpu"]
    try:
        probe = subprocess.run(unprivileged([sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"]),
                               env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, "the folder must really be read-only"
        proc = subprocess.run(unprivileged(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --json {ro / 'cmp.json'}: folder {ro} is not writable (Permission "
                                  f"denied)"), proc.stderr
    assert proc.stdout == "" and list(ro.iterdir()) == [] and not list(files["tmp"].glob("*.fid-inception-*"))
