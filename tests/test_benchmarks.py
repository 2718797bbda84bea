"""The benchmark scripts cannot rot: gpu_check.sh end to end on CPU (--tiny, no compiling)
and bench_sampler.py's quick mode in-process on a narrow AliTok."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FIXTURES, ROOT
from softcfg_patch.run import registry


@pytest.mark.e2e
def test_gpu_check_tiny_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    for family in ("alitok", "rar"):  # teacher-forced logits equal the golden ones
        assert result["logits"][family]["ok"] and result["logits"][family]["max_abs_diff"] <= 1e-4
    rows = result["sampler"]
    assert {(r["model"], r["path"], r["method"]) for r in rows} == {
        (f"{m}_tiny", p, k) for m in ("alitok", "rar") for p in ("eager tf32", "eager bf16")
        for k in ("cfg", "softcfg")}
    assert all(r["images_per_s"] > 0 and r["roofline"] > 0 and r["bytes_per_step"] > 0 for r in rows)
    for m, config in (("alitok", "alitok_ar_tiny_config.yaml"), ("rar", "rar_tiny_config.yaml")):
        # the bf16 rows hold bf16 linear weights (sample.precision=bf16), counted independently here
        model = registry.get(m).resolve("generator_class")(OmegaConf.load(FIXTURES / config))
        total = sum(p.numel() for p in model.parameters())
        linear = sum(p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear)
                     for p in mod.parameters())
        weights = {r["path"]: r["weight_bytes"] for r in rows if r["model"] == f"{m}_tiny"}
        assert weights == {"eager tf32": 4 * total, "eager bf16": 4 * total - 2 * linear}
    assert result["inception"]["images_per_s"] > 0 and result["copy_gb_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| alitok_tiny |") == 4 and "max |diff|" in table


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_sampler_quick_mode_prints_ratios_and_profile(capsys, monkeypatch, precision):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_sampler
    monkeypatch.setattr(sys, "argv", ["bench_sampler.py", "--model", "alitok_b", "--hidden-size", "64",
                                      "--layers", "1", "--batch-size", "1", "--steps", "3",
                                      "--repeats", "1", "--no-compile", "--device", "cpu",
                                      "--precision", precision])
    bench_sampler.main()
    out = capsys.readouterr().out
    assert "3 steps" in out and "SoftCFG / CFG time, eager" in out and f"cpu, {precision}," in out
    share = float(out.split("profile eager_softcfg: ")[1].split(" %")[0])
    assert 0 < share < 100  # matmul share of the profiled CPU time
