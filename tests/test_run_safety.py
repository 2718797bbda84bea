"""Nothing mixed, nothing lost (issue 20): one run per output folder (a lock held for the run's
life, real processes racing), overwrite that removes only what a run made, images that all
belong to the run, bounded plans and seeds, out-of-memory and interrupts in one line, and the
reason of a refused torchrun printed exactly once whatever the order the processes end in."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import softcfg_patch as sp
from conftest import FIXTURES, ROOT
from softcfg_patch.errors import ConfigError
from softcfg_patch.run import config as run_config
from softcfg_patch.run import output, runner
from softcfg_patch.run.lock import RunLock
from softcfg_patch.shards import Layout, save_shard, shard_path
from test_run_manifest import copy_run, sample, unprivileged  # noqa: F401  (helpers)
from test_sample_cli import SCRIPT, TINY, free_port, read_outputs, single_run  # noqa: F401  (fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SAME = ("--sample.num_fid_samples=5", "--sample.save_tokens=True", "--model.generator.softcfg_strength=1")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def expected_tokens(tiny_alitok, seed: int, n: int = 5, batch: int = 2) -> np.ndarray:
    """The tokens a run of `seed` must hold, drawn here batch by batch (tokens are exact across processes)."""
    g = sp.Guidance(guidance_scale=3.0, guidance_scale_pow=1.0, softcfg_strength=1.0)
    plan = runner.batch_plan(n, batch)
    return np.concatenate([sp.generate(tiny_alitok, torch.tensor(list(plan[k])), g,
                                       generator=torch.Generator().manual_seed(runner.batch_seed(seed, k))).numpy()
                           for k in range(len(plan))])


def errors(err: str) -> list[str]:
    """The `error:` lines of a run's stderr (tqdm's bar shares the stream)."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def start(out, *args):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--config", TINY, f"--experiment.output_dir={out}",
                             *SAME, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"


# ------------------------------------------------------------------------------- the lock
@pytest.mark.e2e
def test_a_second_lock_is_refused_naming_the_holder_and_a_crash_releases_it(tmp_path):
    held = RunLock.acquire(tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on host .+, started "
                                          rf"20\d\d-.+\); wait for it to finish or use another"):
        RunLock.acquire(tmp_path / "run")
    held.release()
    RunLock.acquire(tmp_path / "run").release()
    crash = ("import os, signal, sys; from pathlib import Path; from softcfg_patch.run.lock import RunLock; "
             "RunLock.acquire(Path(sys.argv[1])); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", crash, str(tmp_path / "run")], env=ENV, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    RunLock.acquire(tmp_path / "run").release()  # no stale lock: the kernel dropped it with the process


@pytest.mark.e2e
@pytest.mark.parametrize("first_seed,second_seed", [(0, 5), (5, 0)])
def test_two_samplers_in_one_folder_never_mix(tmp_path, tiny_alitok, first_seed, second_seed):
    """The race of the issue, both orders: the first run holds the folder (stopped right after it
    claimed it); the second, with sample.overwrite=True, is refused at once and deletes nothing;
    the first then finishes with only its own samples."""
    out = tmp_path / "race"
    first = start(out, f"--sample.seed={first_seed}")
    wait_for(out / "manifest.json", first)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, str(SCRIPT), "--config", TINY, f"--experiment.output_dir={out}",
                                 *SAME, f"--sample.seed={second_seed}", "--sample.overwrite=True"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"is in use by another run (pid {first.pid} on host" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _, tokens, _ = read_outputs(out)
    assert np.array_equal(tokens, expected_tokens(tiny_alitok, first_seed))
    with np.load(f"{out}.npz") as npz:
        assert json.loads(str(npz["manifest"]))["images"]["sample.seed"] == first_seed


# ------------------------------------------------------------------- overwrite removes ours only
@pytest.mark.e2e
def test_overwrite_removes_exactly_the_files_of_a_run(single_run, tmp_path, capsys):
    out = copy_run(single_run, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "shards" / "mine.npz").write_bytes(b"x")
    (out / "cat.png").write_bytes(b"x")
    (out / ".000001.png.123.tmp").write_bytes(b"half")  # a killed run's temporary is ours
    ours = output.output_files(out)
    assert len(ours) == 5 + 3 + 1 + 1 + 2  # PNGs, shards, manifest, temporary, two npz
    code, stdout, err = sample(capsys, f"--experiment.output_dir={out}", "--sample.num_fid_samples=2",
                               "--sample.seed=1", "--sample.overwrite=True")
    assert code == 0, err
    assert f"removed {len(ours)} files of the previous run" in stdout
    assert (out / "notes.txt").read_text() == "mine" and (out / "cat.png").read_bytes() == b"x"
    assert (out / "shards" / "mine.npz").read_bytes() == b"x"
    assert sorted(p.name for p in (out / "shards").glob("batch_*")) == ["batch_000000.npz"]  # the new run's
    assert not (out / ".000001.png.123.tmp").exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "cat.png"]


def test_a_folder_left_empty_is_removed_and_the_lock_is_never_listed(tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    np.savez(out / "shards" / "batch_000000.npz", tokens=np.zeros((2, 3), np.uint8))
    lock = RunLock.acquire(out)
    try:
        assert output.output_files(out) == [out / "shards" / "batch_000000.npz"]
        manifest = {"format": 1, "images": {}, "recorded": {}}
        output.prepare_output(out, manifest, overwrite=True)
        assert not (out / "shards").exists() and (out / ".lock").is_file()
    finally:
        lock.release()


# ----------------------------------------------------------- every image in the npz is the run's
def test_a_batch_changed_by_another_process_is_moved_aside_and_redrawn(single_run, tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "mixed"
    save_png = output.save_png

    def save_and_intrude(path, image):  # as if another process rewrote batch 0 while batch 2 ran
        save_png(path, image)
        if path.name == "000004.png":
            save_png(out / "000000.png", np.zeros_like(image))

    monkeypatch.setattr(output, "save_png", save_and_intrude)
    code, _, err = sample(capsys, f"--experiment.output_dir={out}", *SAME)
    assert code == 2 and len(errors(err)) == 1 and "Traceback" not in err, err
    assert "the npz was not written: files of 1 batch(es)" in err and "(batches 0)" in err
    assert not os.path.exists(f"{out}.npz")
    assert sorted(p.name for p in (out / "foreign").glob("*.png")) == ["000000.png", "000001.png"]
    monkeypatch.setattr(output, "save_png", save_png)
    code, stdout, err = sample(capsys, f"--experiment.output_dir={out}", *SAME)
    assert code == 0 and "resuming: 2 of 3 batches" in stdout, err
    images, tokens, _ = read_outputs(out)
    _, want_tokens, _ = read_outputs(single_run)
    assert np.array_equal(tokens, want_tokens) and images[0].any()


def make_batches(out):
    """Batch 0 (PNGs 0, 1) from an earlier run, batch 1 (PNGs 2, 3) written by this one."""
    plan = runner.batch_plan(4, 2)
    for k in range(2):
        save_shard(shard_path(out, k), {"indices": np.arange(2 * k, 2 * k + 2), "tokens": np.zeros((2, 3))})
    for i in range(4):
        output.save_png(output.png_path(out, i), np.full((4, 4, 3), i, np.uint8))
    started = os.stat(output.png_path(out, 3)).st_mtime_ns
    for path in output.batch_files(out, 0, plan[0], Layout("png")):
        os.utime(path, ns=(started - 10 ** 9, started - 10 ** 9))
    ledger = output.Ledger(out)
    ledger.record(1, output.batch_files(out, 1, plan[1], Layout("png")))
    return plan, ledger.batches, started


@pytest.mark.parametrize("intruder,batch", [(0, 0), (3, 1)])
def test_files_newer_than_the_run_and_not_its_own_are_refused(tmp_path, intruder, batch):
    plan, written, started = make_batches(tmp_path / "ok")
    output.check_ownership(tmp_path / "ok", plan, written, started, Layout("png"))  # resumed + own: accepted
    out = tmp_path / "bad"
    plan, written, started = make_batches(out)
    later = started + 10 ** 9  # an older run's file touched now, or one of ours replaced
    output.save_png(output.png_path(out, intruder), np.zeros((4, 4, 3), np.uint8))
    os.utime(output.png_path(out, intruder), ns=(later, later))
    with pytest.raises(ConfigError, match=rf"files of 1 batch\(es\) .*\(batches {batch}\)"):
        output.check_ownership(out, plan, written, started, Layout("png"))
    moved = sorted(str(p.relative_to(out / "foreign")) for p in (out / "foreign").rglob("*") if p.is_file())
    assert moved == [f"{i:06d}.png" for i in plan[batch]] + [f"shards/batch_{batch:06d}.npz"]
    assert not output.png_path(out, intruder).exists()


# ----------------------------------------------------------------------- bounded and honest
def test_the_batch_plan_is_lazy_and_absurd_sizes_and_seeds_are_refused(capsys):
    plan = runner.batch_plan(10 ** 12, 3)
    assert len(plan) == 333_333_333_334 and plan[-1] == range(10 ** 12 - 1, 10 ** 12)
    assert list(runner.batch_plan(5, 2)) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(IndexError):
        plan[len(plan)]
    code, _, err = sample(capsys, "--sample.num_fid_samples=1000000000000")
    assert code == 2 and "sample.num_fid_samples=1000000000000 is more than this sampler takes" in err
    code, _, err = sample(capsys, f"--sample.seed={2 ** 70}")
    assert code == 2 and f"sample.seed must be below 2^63 = {2 ** 63}, got {2 ** 70}" in err
    assert run_config.parse_cli(["--config", TINY, f"--sample.seed={2 ** 63 - 1}"], "alitok").sample.seed == 2 ** 63 - 1


def test_out_of_memory_is_one_line_and_the_finished_batches_resume(single_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "oom"
    calls = []

    def generate_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 560000000000 bytes. Error code 12")
        return sp.generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", generate_then_fail)
    code, _, err = sample(capsys, f"--experiment.output_dir={out}", *SAME)
    assert code == 2 and len(errors(err)) == 1 and "Traceback" not in err
    assert "out of memory drawing a batch of 2 images on cpu (sample.per_proc_batch_size=2" in err
    assert "The 1 batches finished by this process are kept" in err and "e.g. 1" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    monkeypatch.setattr(runner, "generate", sp.generate)
    code, stdout, err = sample(capsys, f"--experiment.output_dir={out}", *SAME)
    assert code == 0 and "resuming: 1 of 3 batches" in stdout, err
    assert np.array_equal(read_outputs(out)[1], read_outputs(single_run)[1])


@pytest.mark.e2e
def test_a_real_allocator_failure_is_one_line(tmp_path):
    """Under an address-space limit, a batch far too large fails in the real allocator."""
    import resource
    limit = 4 << 30
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", TINY, f"--experiment.output_dir={tmp_path / 'o'}",
                           "--sample.num_fid_samples=1000000", "--sample.per_proc_batch_size=1000000"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: out of memory drawing a batch of 1000000 images on cpu" in proc.stderr


# --------------------------------------------------------------------------- small ones
def test_dot_names_the_npz_after_the_folder_and_a_broken_link_is_explained(tmp_path, capsys, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = sample(capsys, "--experiment.output_dir=.", "--sample.num_fid_samples=1")
    assert code == 0, err
    assert (tmp_path / "here.npz").is_file() and not (tmp_path / "here" / "..npz").exists()
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    code, _, err = sample(capsys, f"--experiment.output_dir={tmp_path / 'link'}")
    assert code == 2 and f"is a broken symbolic link (it points to '{tmp_path / 'gone'}'" in err
    assert "Errno" not in err


def test_wandb_without_the_package_is_refused_before_anything_is_written(tmp_path, capsys):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    code, _, err = sample(capsys, f"--experiment.output_dir={tmp_path / 'o'}", "--wandb.enabled=True")
    assert code == 2 and "pip install wandb" in err and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- interrupts
@pytest.mark.e2e
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_says_how_far_the_run_got_and_a_rerun_resumes(tmp_path, sig, code):
    out = tmp_path / "stop"
    args = ("--sample.num_fid_samples=40",)
    proc = start(out, *args)
    wait_for(out / "shards" / "batch_000000.npz", proc)  # the last file of batch 0
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in err and not os.path.exists(f"{out}.npz")
    done, total = map(int, re.search(r"interrupted after (\d+) of (\d+) batches; rerun the same command to resume",
                                     lines[0]).groups())
    assert total == 20 and 1 <= done < 20
    assert len(list(out.glob("*.png"))) >= 2 * done and not list(out.glob(".*.tmp"))
    if sig == signal.SIGTERM:  # the same command finishes the rest
        rerun = start(out, *args)
        stdout, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0 and f"resuming: {done}" in stdout, err
        assert read_outputs(out)[0].shape[0] == 40


@pytest.mark.e2e
def test_an_interrupt_under_torchrun_prints_one_line(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(SCRIPT), "--config", TINY,
                             f"--experiment.output_dir={out}", "--sample.num_fid_samples=60"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "000002.png", proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends torchrun; it passes the signal on to the ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert len(re.findall(r"interrupted after \d+ of 30 batches; rerun the same command to resume", err)) == 1, err
    assert "KeyboardInterrupt" not in err and "sample_imagenet.py\", line" not in err  # no trace of our processes


# -------------------------------------------------------------- the reason, once, under torchrun
SLOW_RANK_ZERO = """import os, runpy, sys, time
if os.environ["RANK"] == "0":
    time.sleep(4)  # rank 1 finishes its checks and exits long before rank 0 has printed anything
args = [a for a in sys.argv[1:] if not a.startswith("--only-rank-1=") or os.environ["RANK"] == "1"]
sys.argv = [{script!r}] + [a.replace("--only-rank-1=", "--") for a in args]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("bad,who", [("--experiment.generator_checkpoint=weights/none.bin", ""),
                                     ("--only-rank-1=experiment.generator_checkpoint=weights/none.bin", "rank 1: ")])
@pytest.mark.e2e
def test_the_reason_is_printed_once_even_when_rank_zero_is_slow(tmp_path, bad, who):
    wrapper = tmp_path / "slow_rank_zero.py"
    wrapper.write_text(SLOW_RANK_ZERO.format(script=str(SCRIPT)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(wrapper), "--config", TINY,
                           f"--experiment.output_dir={tmp_path / 'o'}", bad],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.stderr.count("input file problem(s)") == 1, proc.stderr
    assert f"error: {who}1 input file problem(s), nothing was started" in proc.stderr
    assert "Traceback" not in proc.stderr.split("input file problem(s)")[0]
    assert not (tmp_path / "o").exists()
