"""The benchmark scripts cannot rot: gpu_check.sh end to end on CPU (--tiny, no compiling),
bench_sampler.py's quick mode in-process on a narrow AliTok, and bench_pipeline.py's tiny mode
in-process (every route, four images). No timing thresholds: only structure and consistency."""
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
    pipeline = result["pipeline"]  # section 5: one whole run, sample.images=none + evaluation while sampling
    assert (pipeline["model"], pipeline["num_images"], pipeline["batch"]) == ("tiny", 4, 2)
    assert pipeline["images_per_s"] > 0 and pipeline["run_s"] <= pipeline["wall_s"]
    assert sum(pipeline["shares"].values()) == pytest.approx(1.0)
    assert all(pipeline["seconds"][stage] > 0 for stage in ("generate", "decode", "write", "inception", "metrics"))
    assert pipeline["seconds"]["assemble"] == 0 and 0 < pipeline["bytes_per_image"] < 256 * 256 * 3  # no image kept
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| alitok_tiny |") == 4 and "max |diff|" in table
    assert "End to end (tiny, 4 images, batch 2, sample.images=none + evaluation)" in table


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


def bench_pipeline_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pipeline
    return bench_pipeline


def test_bench_pipeline_tiny_times_every_route_and_counts_its_bytes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runner keeps this process's thread count
    bench = bench_pipeline_module()
    work, report = tmp_path / "work", tmp_path / "pipeline.json"
    result = bench.main(["--size", "tiny", "--num-images", "4", "--batch", "2", "--repeats", "1", "--device", "cpu",
                         "--workdir", str(work), "--json", str(report)])
    printed = capsys.readouterr().out
    assert json.loads(report.read_text()) == json.loads(json.dumps(result))
    routes, n, raw = result["routes"], 4, 256 * 256 * 3
    assert list(routes) == ["bare", "png", "shards", "none"] and result["repeats"] == 1
    for name, r in routes.items():
        seconds = r["seconds"]
        assert seconds["generate"] > 0 and seconds["decode"] > 0, name
        assert all(v >= 0 for v in seconds.values()), name  # "other" too: every stage lies inside the run
        assert sum(seconds.values()) == pytest.approx(r["run_s"]) and r["run_s"] <= r["wall_s"]
        assert sum(r["shares"].values()) == pytest.approx(1.0)
        assert r["per_image_s"]["generate"] == pytest.approx(seconds["generate"] / n)
        assert r["images_per_s"] == pytest.approx(n / r["run_s"])
        evaluates = name in ("bare", "none")
        assert (seconds["inception"] > 0) == evaluates and (seconds["metrics"] > 0) == (name == "none")
        assert (seconds["write"] > 0) == (name != "bare")
        assert (seconds["assemble"] > 0) == (name in ("png", "shards"))
    size = {name: r["bytes_per_image"] for name, r in routes.items()}
    assert size["bare"] == {"png": 0, "shards": 0, "npz": 0, "total": 0}
    assert size["png"]["png"] > 0 and 0 < size["png"]["shards"] < raw / 100  # tokens only beside the PNGs
    assert size["shards"]["png"] == 0 and size["shards"]["shards"] > raw  # the uint8 images themselves
    for name in ("png", "shards"):  # the same arr_0 from PNGs or shards: the same size but for the manifest
        assert raw < size[name]["npz"] < raw * 1.1
        assert size[name]["total"] > size[name]["png"] + size[name]["shards"] + size[name]["npz"]  # + manifest
    assert size["none"]["png"] == size["none"]["npz"] == 0 and 0 < size["none"]["shards"] < raw  # no image kept
    assert len(list((work / "png-0").glob("*.png"))) == n and (work / "none-0.metrics.json").is_file()
    ratios = result["ratios"]
    png, shards = (sum(routes[r]["seconds"][k] for k in ("write", "assemble")) for r in ("png", "shards"))
    assert ratios["a"]["value"] == pytest.approx(png / shards)
    assert ratios["b"]["value"] == pytest.approx(1 - routes["shards"]["shares"]["generate"]
                                                 - routes["shards"]["shares"]["decode"])
    assert ratios["c"]["value"] == pytest.approx(routes["none"]["run_s"] / routes["bare"]["run_s"])
    assert ratios["c"]["without_metrics"] < ratios["c"]["value"]
    for key, r in ratios.items():
        assert r["met"] == (r["value"] >= r["target"] if key == "a" else r["value"] <= r["target"])
        assert f"({key}) " in printed and ("NOT met" in printed.split(f"({key}) ")[1].splitlines()[0]) != r["met"]
    assert all(line in printed for line in ("route ", "\nbare ", "\npng ", "\nshards ", "\nnone "))


def test_bench_pipeline_refuses_too_few_images_and_unknown_routes(capsys):
    bench = bench_pipeline_module()
    for argv, message in ((["--num-images", "2"], "at least 4"), (["--routes", "png,jpeg"], "unknown route(s) jpeg")):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
