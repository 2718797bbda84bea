"""The table scripts (scripts/*.sh, run_setting.py, collect_results.py, plot_sweep.py).

Fast tests check the pieces on synthetic rows. The end-to-end tests run every shell
script with SMOKE=1 (tiny golden models, 4 samples, random Inception network) into one
shared results folder, in file order, so later tables reuse earlier samples the way a user's
runs do. Together they take a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from softcfg_patch.errors import SoftCFGError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import collect_results  # noqa: E402
import plot_sweep  # noqa: E402
import run_setting  # noqa: E402

KNOBS = ("SMOKE", "SEEDS", "RESULTS", "NUM_SAMPLES", "NPROC", "WEIGHTS", "REF", "INCEPTION", "BATCH",
         "DEVICE", "WANDB", "DELETE_SAMPLES", "EVALUATOR", "MODEL", "SCALES", "POWS", "IN_PROCESS")
ROW_FIELDS = ("run", "table", "model", "method", "smoke", "label", "guidance", "seed", "num_samples",
              "metrics", "git_commit", "evaluator", "inception_weights", "reference", "wall_time_s")
RECIPE_SHA = json.loads((ROOT / "tests/fixtures/inception/weights_recipe.json").read_text())["sha256_472_float_keys"]


def run(cmd: list, **env: str) -> subprocess.CompletedProcess:
    """Run from the repository root with only the knobs given here (the caller's are dropped)."""
    full = {k: v for k, v in os.environ.items() if k not in KNOBS}
    full.update(env)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=full, capture_output=True, text=True, timeout=900)


def rows_of(folder: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))]


# ----------------------------------------------------------------------------- fast
def test_guidance_defaults_mirror_the_core():
    from softcfg_patch.guidance import Guidance
    assert run_setting.GUIDANCE_DEFAULTS == Guidance().to_dict()


def guidance(**changes) -> dict:
    return {**run_setting.GUIDANCE_DEFAULTS, **changes}


def test_run_names_share_identical_images_only():
    name = lambda g, seed=0: run_setting.run_name("alitok_xl", False, g, seed, 50000, 125)  # noqa: E731
    cfg = guidance(guidance_scale=13.0, guidance_scale_pow=1.4)
    # SoftCFG options cannot change a CFG sample, and an unguided sample ignores the schedule
    assert name(cfg) == name({**cfg, "step_norm": False, "softcfg_target": "k"})
    assert name(guidance(guidance_scale=0.0)) == name(guidance(guidance_scale=0.0, guidance_scale_pow=2.0))
    soft = {**cfg, "softcfg_strength": 1.0}
    others = [cfg, {**soft, "softcfg_target": "k"}, {**soft, "step_norm": False}, {**soft, "guidance_scale": 9.0}]
    assert len({name(soft), name(soft, seed=1), *map(name, others)}) == 6
    assert name(soft).startswith("alitok_xl_softcfg_seed0_n50000_")
    assert name(guidance(guidance_scale=0.0)).startswith("alitok_xl_noguidance_")
    assert run_setting.run_name("alitok_xl", True, soft, 0, 4, 4).startswith("smoke_")


def synthetic_row(model: str, method: str, seed: int, fid: float, is_: float, order: int = 1,
                  smoke: bool = False, **g) -> dict:
    return {"model": model, "method": method, "smoke": smoke, "seed": seed, "order": order,
            "num_samples": 50000, "git_commit": "abc123", "guidance": guidance(**g),
            "inception_weights": {"sha256": "w"},
            "metrics": {"fid": fid, "inception_score": is_, "sfid": 6.0 + seed, "precision": 0.8, "recall": 0.6}}


def write_rows(folder: Path, rows: list) -> Path:
    (folder / "rows").mkdir(parents=True)
    for i, row in enumerate(rows):
        (folder / "rows" / f"r{i}.json").write_text(json.dumps(row))
    return folder


def test_collect_results_mean_std_markdown_and_csv(tmp_path):
    soft = dict(guidance_scale=9.0, guidance_scale_pow=1.5, softcfg_strength=1.0)
    rows = [synthetic_row("alitok_xl", "SoftCFG", s, fid, is_, order=2, **soft)
            for s, fid, is_ in ((0, 1.30, 300.0), (1, 1.25, 302.0), (2, 1.27, 304.0))]
    rows += [synthetic_row("alitok_xl", "CFG", 0, 1.35, 290.0, order=1, guidance_scale=13.0),
             synthetic_row("alitok_b", "CFG", 0, 1.50, 280.0, order=1, guidance_scale=16.0)]
    folder = write_rows(tmp_path / "t", rows)
    assert collect_results.main([str(folder)]) == 0

    # by hand: mean (1.30 + 1.25 + 1.27) / 3 = 1.273333; deviations .026667, -.023333, -.003333;
    # squares sum to .00126667; / (3 - 1) = .00063333; sqrt = .0251661. IS: 302 ± 2.
    md = (folder / "results.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| alitok")]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| alitok_b", "CFG"], ["| alitok_xl", "CFG"], ["| alitok_xl", "SoftCFG"]]  # size, then order
    assert "| 1.273 ± 0.025 | 302.0 ± 2.0 | 7.000 ± 1.000 | 0.800 ± 0.000 | 0.600 ± 0.000 | - | 3 |" in lines[2]
    assert "| 1.350 | 290.0 |" in lines[1] and "±" not in lines[1]  # one seed: no spread
    assert "γ=9 k=1.5 α=1 StepNorm v/sampled/source" in lines[2] and "SMOKE" not in md

    table = list(csv.DictReader(open(folder / "results.csv")))
    soft_row = [r for r in table if r["method"] == "SoftCFG"][0]
    assert soft_row["n_seeds"] == "3" and soft_row["seeds"] == "0 1 2" and soft_row["note"] == ""
    assert math.isclose(float(soft_row["fid_mean"]), 1.2733333333, rel_tol=1e-9)
    assert math.isclose(float(soft_row["fid_std"]), 0.0251661148, rel_tol=1e-8)
    assert math.isclose(float(soft_row["inception_score_std"]), 2.0, rel_tol=1e-12)
    assert float(soft_row["guidance_scale"]) == 9.0 and soft_row["softcfg_target"] == "v"
    cfg_row = [r for r in table if r["model"] == "alitok_xl" and r["method"] == "CFG"][0]
    assert cfg_row["fid_std"] == "" and cfg_row["n_seeds"] == "1"


def test_collect_results_labels_smoke_and_rejects_broken_rows(tmp_path):
    folder = write_rows(tmp_path / "s", [synthetic_row("rar_l", "CFG", 0, 90.0, 1.0, smoke=True)])
    assert collect_results.main([str(folder), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out.md").read_text()
    assert "NOT real FID" in md and "| rar_l (SMOKE) |" in md
    assert list(csv.DictReader(open(tmp_path / "out.csv")))[0]["note"] == "SMOKE - NOT a real FID"

    (folder / "rows" / "bad.json").write_text(json.dumps({"model": "rar_l"}))
    with pytest.raises(SoftCFGError, match="bad.json lacks"):
        collect_results.load_rows([folder])
    with pytest.raises(SoftCFGError, match="not a folder"):
        collect_results.load_rows([tmp_path / "missing"])


def paired_rows(folder: Path) -> list:
    """CFG and SoftCFG rows for seeds 0 and 1, with bootstrap stds and cached paired comparisons."""
    rows = []
    for seed, (cfg_fid, soft_fid, std_a, std_b, delta_std) in enumerate(((1.35, 1.30, 0.02, 0.03, 0.01),
                                                                         (1.37, 1.28, 0.04, 0.02, 0.02))):
        cfg = synthetic_row("alitok_xl", "CFG", seed, cfg_fid, 290.0, guidance_scale=13.0)
        soft = synthetic_row("alitok_xl", "SoftCFG", seed, soft_fid, 300.0, order=2, guidance_scale=9.0,
                             softcfg_strength=1.0)
        for row, std in ((cfg, std_a), (soft, std_b)):
            row.update(run=f"{row['method']}{seed}", samples=f"/nonexistent/{row['method']}{seed}.npz",
                       per_proc_batch_size=125, bootstrap={"fid": {"std": std}})
        (folder / "pairs").mkdir(parents=True, exist_ok=True)
        (folder / "pairs" / f"CFG{seed}__SoftCFG{seed}.b200.json").write_text(json.dumps({"metrics": {"fid": {
            "a": cfg_fid, "b": soft_fid, "delta": soft_fid - cfg_fid, "std": delta_std}}}))
        rows += [cfg, soft]
    return rows


def test_collect_results_paired_deltas_and_noise_floor(tmp_path, capsys):
    folder = tmp_path / "t"
    rows = paired_rows(folder)
    rows.append(synthetic_row("alitok_xl", "SoftCFG", 2, 1.2, 300.0, order=2, guidance_scale=9.0,
                              softcfg_strength=1.0))  # seed 2 has no CFG row: listed as not paired
    rows[-1].update(run="SoftCFG2", samples="/nonexistent/x.npz", per_proc_batch_size=125)
    write_rows(folder, rows)
    assert collect_results.main([str(folder), "--baseline", "CFG"]) == 0
    md = (folder / "results.md").read_text()
    soft = next(line for line in md.splitlines() if "| SoftCFG |" in line)
    # by hand: deltas -0.05 and -0.09, mean -0.07; std sqrt(0.01^2 + 0.02^2) / 2 = 0.0111803;
    # 95% CI -0.07 -+ 1.959964 * 0.0111803 = -0.0919 .. -0.0481; p = erfc(0.07 / 0.0111803 / sqrt 2) = 3.8e-10
    assert "| -0.070 (-0.092 to -0.048), p = 3.8e-10 |" in soft
    assert "| ± 0.025 |" in soft  # mean bootstrap std of the two seeds that carry one (0.03, 0.02)
    assert "not paired: SoftCFG seed 2: no CFG row with that seed" in md
    assert "noise floor at that N: median ± 0.028 at 50000 samples" in md  # median of 0.03 (CFG), 0.025
    table = {r["method"]: r for r in csv.DictReader(open(folder / "results.csv"))}
    assert math.isclose(float(table["SoftCFG"]["delta_fid_std"]), math.sqrt(0.01 ** 2 + 0.02 ** 2) / 2)
    assert table["CFG"]["delta_fid_mean"] == "" and math.isclose(float(table["CFG"]["fid_boot_std"]), 0.03)
    # the pair cache was used: the samples do not exist, so computing a comparison would have failed
    with pytest.raises(SystemExit) as stop:
        collect_results.main([str(folder), "--baseline", "DDPM"])
    assert stop.value.code == 2 and "no rows with method 'DDPM'" in capsys.readouterr().err


def test_best_setting_and_search_summary(tmp_path, capsys):
    folder = tmp_path / "grid"
    write_rows(folder, paired_rows(tmp_path / "unused"))
    assert collect_results.main([str(folder), "--best", "SoftCFG"]) == 0
    assert capsys.readouterr().out.strip() == ("--guidance-scale 9.0 --guidance-scale-pow 1.0 "
                                               "--softcfg-strength 1.0 --step-norm true")
    assert collect_results.main([str(folder), "--search-summary"]) == 0
    out = capsys.readouterr().out
    # means over the two seeds: CFG (1.35 + 1.37) / 2, SoftCFG (1.30 + 1.28) / 2
    assert "best CFG on the proxy grid: FID 1.360" in out and "best SoftCFG on the proxy grid: FID 1.290" in out
    assert "difference SoftCFG - CFG: -0.070" in out and "bootstrap std of FID is ± 0.028" in out


def test_plot_sweep_draws_both_methods(tmp_path):
    from PIL import Image
    rows = [synthetic_row("alitok_xl", method, seed, fid + 0.01 * seed, 280.0 + scale, guidance_scale=scale,
                          guidance_scale_pow=1.4, softcfg_strength=strength, smoke=True)
            for method, strength, fid in (("CFG", 0.0, 1.4), ("SoftCFG", 1.0, 1.3))
            for scale in (9.0, 13.0) for seed in (0, 1)]
    folder = write_rows(tmp_path / "sweep", rows)
    assert plot_sweep.main([str(folder)]) == 0
    image = Image.open(folder / "sweep.png")
    assert image.size[0] > 600 and "SMOKE" in image.text["Title"] and "NOT a real FID" in image.text["Title"]
    groups = collect_results.summarize(rows)
    assert sorted(plot_sweep.line_label(g) for g in groups)[0] == "alitok_xl CFG, k=1.4 [SMOKE]"


@pytest.mark.e2e
def test_table_scripts_import_without_torch():
    # collect_results only reads rows and the registry; importing it (and run_setting, which
    # hands the heavy work to subprocesses) must not pay for torch. Lazy package exports.
    code = ("import runpy, sys\n"
            "for name in ('collect_results', 'run_setting'):\n"
            "    runpy.run_path(f'scripts/{name}.py', run_name='imported')\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    res = run([sys.executable, "-c", code], PYTHONPATH=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    import softcfg_patch as sp  # every lazily exported name and submodule still resolves
    import softcfg_patch.run as sr
    assert sp.step is sys.modules["softcfg_patch.step"] and sp.generate is sp.sampler.generate
    assert all(getattr(sp, name) is not None for name in sp.__all__)
    assert all(getattr(sr, name) is not None for name in sr.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sp.nope


@pytest.mark.e2e
def test_bad_input_gives_usage_and_listed_downloads(tmp_path):
    for script, arg in (("table1_alitok.sh", "m"), ("table_rar.sh", ""), ("table_ablation.sh", "xl")):
        res = run(["bash", SCRIPTS / script, arg] if arg else ["bash", SCRIPTS / script])
        assert res.returncode == 2 and "usage" in res.stderr, (script, res.stderr)
    res = run(["bash", SCRIPTS / "sweep.sh"], MODEL="dit_xl")
    assert res.returncode == 2 and "MODEL must be" in res.stderr

    results = tmp_path / "results"
    res = run([sys.executable, SCRIPTS / "run_setting.py", "--table", "t", "--model", "alitok_xl",
               "--method", "CFG"], WEIGHTS=str(tmp_path / "empty"), RESULTS=str(results))
    assert res.returncode == 2
    for needle in ("alitok_xl.bin", "AliTok.pth", "VIRTUAL_imagenet256_labeled.npz", "ali-vilab/alitok",
                   "guided-diffusion"):
        assert needle in res.stderr, needle
    assert "Traceback" not in res.stderr and not results.exists()  # nothing started

    res = run([sys.executable, SCRIPTS / "run_setting.py", "--table", "t", "--model", "rar_b", "--method",
               "CFG", "--smoke"], NUM_SAMPLES="2", RESULTS=str(results))
    assert res.returncode == 2 and "must be >= 4" in res.stderr


@pytest.mark.e2e
def test_wandb_without_the_package_is_refused_up_front(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    res = run([sys.executable, SCRIPTS / "run_setting.py", "--table", "t", "--model", "alitok_b",
               "--method", "CFG"], SMOKE="1", WANDB="1", RESULTS=str(tmp_path))
    assert res.returncode == 2 and "pip install wandb" in res.stderr
    assert not (tmp_path / "samples").exists()


# ----------------------------------------------------------------------------- preflight
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title></head></html>\n"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """run_setting's defaults read the environment: drop every knob, and leave the evaluator's
    Inception search nothing to find outside the test's folders (cwd, torch.hub)."""
    for knob in KNOBS + ("SOFTCFG_INCEPTION_WEIGHTS",):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def real_argv(tmp_path: Path, *extra: str) -> list:
    return ["--table", "t", "--model", "alitok_xl", "--method", "CFG", "--num-samples", "4", "--batch", "4",
            "--weights", str(tmp_path / "weights"), "--results", str(tmp_path / "results"), *extra]


def put(folder: Path, name: str, data: bytes = b"\0" * 64) -> Path:
    """A stand-in file: the preflight only checks that checkpoints exist and are no web page."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def save_images(path: Path, n: int = 4, side: int = 256) -> Path:
    import numpy as np
    np.savez(path, np.zeros((n, side, side, 3), dtype=np.uint8))
    return path


def bad_reference(path: Path, kind: str) -> Path:
    import numpy as np
    if kind == "html":
        path.write_bytes(HTML_PAGE)
    elif kind == "truncated":  # an interrupted download: the zip directory at the end is gone
        data = save_images(path).read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        np.savez(path, mu=np.zeros(2048))  # statistics only, no arr_0 images
    return path


@pytest.mark.parametrize("kind,needle", [("html", "HTML"), ("truncated", "truncated|not an .npz"),
                                         ("no_arr_0", "arr_0")])
def test_every_bad_input_is_listed_at_once_before_sampling(clean_env, kind, needle):
    weights = clean_env / "weights"
    put(weights, "alitok_xl.bin", HTML_PAGE)  # a sign-in page saved under the checkpoint's name
    ref = bad_reference(clean_env / "ref.npz", kind)  # and AliTok.pth is missing
    argv = real_argv(clean_env, "--ref", str(ref), "--inception-weights", str(put(weights, INCEPTION_FILE)))
    with pytest.raises(run_setting.SettingError) as err:
        run_setting.main(argv)
    lines = str(err.value).splitlines()
    assert any("alitok_xl.bin" in line and "HTML" in line and "ali-vilab/alitok" in line for line in lines)
    assert any("AliTok.pth" in line and "missing" in line for line in lines)
    assert any(str(ref) in line and re.search(needle, line) and "guided-diffusion" in line for line in lines)
    assert not (clean_env / "results").exists()  # nothing sampled, nothing made
    with pytest.raises(run_setting.SettingError, match="AliTok.pth"):  # the table scripts' preflight says the same
        run_setting.main(argv + ["--check-only"])
    assert not (clean_env / "results").exists()


def test_missing_inception_weights_are_in_the_first_list(clean_env):
    from evaluations.inception import WEIGHT_FILES
    if any((ROOT / "weights" / name).is_file() for name in WEIGHT_FILES):
        pytest.skip("the repository's weights/ holds the Inception weights, which the evaluator's search finds")
    with pytest.raises(run_setting.SettingError) as err:
        run_setting.main(real_argv(clean_env))
    message = str(err.value)
    for needle in ("alitok_xl.bin", "AliTok.pth", "VIRTUAL_imagenet256_labeled.npz", *WEIGHT_FILES,
                   *WEIGHT_FILES.values(), "INCEPTION"):
        assert needle in message, needle
    assert str(clean_env / "weights" / INCEPTION_FILE) in message  # where to put it


STUB_EVALUATOR = '''import json, sys
args = sys.argv[1:]
out = args[args.index("--json") + 1]
weights = args[args.index("--inception-weights") + 1] if "--inception-weights" in args else None
json.dump({"fid": 1.0, "inception_score": 2.0, "sfid": 3.0, "precision": 0.5, "recall": 0.5,
           "settings": {"inception_weights": weights}}, open(out, "w"))
'''


@pytest.mark.e2e
def test_inception_weights_in_weights_folder_reach_the_evaluator(clean_env):
    weights = clean_env / "weights"
    for name in ("alitok_xl.bin", "AliTok.pth", INCEPTION_FILE):
        put(weights, name)
    save_images(weights / "VIRTUAL_imagenet256_labeled.npz")
    evaluator = clean_env / "stub" / "evaluator.py"
    evaluator.parent.mkdir()
    evaluator.write_text(STUB_EVALUATOR)
    argv = real_argv(clean_env, "--evaluator", str(evaluator), "--samples", "png")  # the evaluator route
    # samples already drawn (as by an interrupted earlier run): only the evaluation is left
    args = run_setting.parse_args(argv)
    g = run_setting.effective_guidance(run_setting.OmegaConf.load(run_setting.config_path("alitok_xl", False)), args)
    out = clean_env / "results" / "samples" / run_setting.run_name("alitok_xl", False, g, 0, 4, 4)
    out.parent.mkdir(parents=True)
    save_images(Path(f"{out}.npz"), side=8)
    Path(f"{out}.sampling.json").write_text(json.dumps({"wall_s": 1.0, "command": "earlier"}))
    assert run_setting.main(argv) == 0
    (row,) = rows_of(clean_env / "results" / "t")
    found = str(weights / INCEPTION_FILE)
    assert f"--inception-weights {found}" in row["evaluator"]["command"]
    assert row["inception_weights"]["path"] == found


@pytest.mark.e2e
def test_common_sh_checks_each_model_once_before_its_first_setting(tmp_path):
    stub = tmp_path / "python"  # logs what common.sh runs; fails the preflight when FAIL_CHECK is set
    stub.write_text('#!/usr/bin/env bash\necho "${*:2}" >> "$LOG"\n'
                    '[[ -n "${FAIL_CHECK:-}" && " $* " == *" --check-only "* ]] && exit 2\nexit 0\n')
    stub.chmod(0o755)
    table = ("source scripts/common.sh; setting t alitok_xl CFG --guidance-scale 13; "
             "setting t alitok_xl SoftCFG; setting t rar_l CFG; echo finished")
    log = tmp_path / "log"
    res = run(["bash", "-c", table], PYTHON=str(stub), LOG=str(log), SEEDS="0 1")
    assert res.returncode == 0 and "finished" in res.stdout, res.stderr
    calls = [(line.split()[0] == "--check-only", line.split("--model ")[1].split()[0])
             for line in log.read_text().splitlines()]
    assert calls == [(True, "alitok_xl")] + [(False, "alitok_xl")] * 4 + [(True, "rar_l")] + [(False, "rar_l")] * 2
    assert "--check-only --table t --model alitok_xl --method CFG --guidance-scale 13" in log.read_text()

    log.unlink()  # a failed preflight stops the table with its status before any setting runs
    res = run(["bash", "-c", table], PYTHON=str(stub), LOG=str(log), FAIL_CHECK="1")
    assert res.returncode == 2 and "finished" not in res.stdout
    assert len(log.read_text().splitlines()) == 1


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke") / "results"


def smoke(script: str, results: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    res = run(["bash", SCRIPTS / script, *args], SMOKE="1", RESULTS=str(results), **env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def evaluated_runs(results: Path) -> set:
    """Runs whose samples are already evaluated in this results folder."""
    return {p.name.split(".eval-")[0] for p in (results / "samples").glob("*.eval-*.json")}


def check_reuse(res: subprocess.CompletedProcess, rows: list, before: set, earlier_table: Path, shared: int) -> None:
    """Settings evaluated by an earlier table are reused, not redrawn (`shared` of them when that
    table ran first in this session, as in file order)."""
    reused = [r["run"] for r in rows if r["run"] in before]
    assert res.stdout.count("reusing the samples and evaluation") == len(reused)
    assert all(r["reused"]["sampling"] == (r["run"] in before) for r in rows)
    if earlier_table.is_dir():
        assert len(reused) == shared


def check_row(row: dict) -> None:
    missing = [f for f in ROW_FIELDS if f not in row]
    assert not missing, missing
    assert row["smoke"] is True and "NOT a real FID" in row["label"] and row["run"].startswith("smoke_")
    assert set(row["metrics"]) == {"fid", "inception_score", "sfid", "precision", "recall"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in row["metrics"].values())
    assert set(row["guidance"]) == set(run_setting.GUIDANCE_DEFAULTS) and row["num_samples"] == 4
    assert row["inception_weights"]["sha256"] == RECIPE_SHA  # the seeded random recipe, labelled as such
    assert "NOT the FID Inception" in row["inception_weights"]["kind"]
    assert len(row["git_commit"]) >= 40 or row["git_commit"].startswith("unknown")
    assert len(row["evaluator"]["code_sha256"]) == 64
    assert row["evaluator"]["settings"]["num_samples"] == row["num_samples"]
    boot = row["bootstrap"]  # the evaluator's --bootstrap, centred on the row's metric
    assert boot["num_resamples"] == 100 and boot["fid"]["value"] == row["metrics"]["fid"] and boot["fid"]["std"] > 0
    assert boot["fid"]["ci_low"] < row["metrics"]["fid"] < boot["fid"]["ci_high"]
    assert row["wall_time_s"]["sampling"] > 0 and row["wall_time_s"]["evaluation"] > 0


@pytest.mark.e2e
def test_table1_smoke_with_two_seeds(smoke_results):
    smoke("table1_alitok.sh", smoke_results, "xl", SEEDS="0 1")
    folder = smoke_results / "table1_alitok"
    rows = rows_of(folder)
    assert len(rows) == 4
    for row in rows:
        check_row(row)
    by = {(r["method"], r["seed"]): r["guidance"] for r in rows}
    assert by[("CFG", 1)]["guidance_scale"] == 13 and by[("CFG", 1)]["guidance_scale_pow"] == 1.4
    assert by[("CFG", 1)]["softcfg_strength"] == 0
    assert by[("SoftCFG", 0)] == {**run_setting.GUIDANCE_DEFAULTS, "guidance_scale": 9.0,
                                  "guidance_scale_pow": 1.5, "softcfg_strength": 1.0}
    md = (folder / "results.md").read_text()
    assert "NOT real FID" in md and md.count("| alitok_xl (SMOKE) |") == 2 and md.count(" ± ") >= 10
    table = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["n_seeds"] for r in table] == ["2", "2"] and all(r["note"] for r in table)
    # the CSV's mean and std are those of the two rows
    fids = [r["metrics"]["fid"] for r in rows if r["method"] == "CFG"]
    cfg = [r for r in table if r["method"] == "CFG"][0]
    assert math.isclose(float(cfg["fid_mean"]), sum(fids) / 2, rel_tol=1e-12)
    assert math.isclose(float(cfg["fid_std"]), abs(fids[0] - fids[1]) / math.sqrt(2), rel_tol=1e-9)
    # SoftCFG paired with the CFG run of the same seed, one comparison per seed, cached
    pairs = sorted((folder / "pairs").glob("*.json"))
    assert len(pairs) == 2 and all(p.name.startswith("smoke_alitok_xl_cfg_seed") for p in pairs)
    deltas = [json.loads(p.read_text())["metrics"]["fid"] for p in pairs]
    fid = {(r["method"], r["seed"]): r["metrics"]["fid"] for r in rows}
    assert sorted(d["delta"] for d in deltas) == pytest.approx(
        sorted(fid[("SoftCFG", s)] - fid[("CFG", s)] for s in (0, 1)), rel=1e-6)
    soft = [r for r in table if r["method"] == "SoftCFG"][0]
    assert math.isclose(float(soft["delta_fid_mean"]), sum(d["delta"] for d in deltas) / 2, rel_tol=1e-9)
    assert "ΔFID vs CFG" in md and "Paired settings: 1" in md


@pytest.mark.e2e
def test_rerun_skips_finished_work(smoke_results):
    folder = smoke_results / "table1_alitok"
    smoke("table1_alitok.sh", smoke_results, "xl", SEEDS="0 1")  # already done when run in file order
    watched = sorted((folder / "rows").glob("*.json")) + sorted((smoke_results / "samples").glob("*.npz"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    res = smoke("table1_alitok.sh", smoke_results, "xl", SEEDS="0 1")
    assert res.stdout.count("skip [table1_alitok]") == 4 and "sampling" not in res.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before

    # a lost row is rebuilt from the kept samples and evaluation, without recomputing them
    lost = watched[0]
    old = json.loads(lost.read_text())
    lost.unlink()
    res = smoke("table1_alitok.sh", smoke_results, "xl", SEEDS="0 1")
    assert "reusing the samples and evaluation" in res.stdout and "+ " not in res.stdout
    assert json.loads(lost.read_text())["metrics"] == old["metrics"]
    assert not [p for p in (folder / "rows").iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.e2e
def test_ablation_smoke_runs_every_setting(smoke_results):
    before = evaluated_runs(smoke_results)
    res = smoke("table_ablation.sh", smoke_results)
    rows = {r["method"]: r for r in rows_of(smoke_results / "ablation_alitok_xl")}
    assert len(rows) == 9
    for row in rows.values():
        check_row(row)
    g = {m: r["guidance"] for m, r in rows.items()}
    assert g["No guidance"]["guidance_scale"] == 0 and rows["No guidance"]["kind"] == "noguidance"
    assert g["SoftCFG w/o StepNorm"]["step_norm"] is False and g["SoftCFG w/ StepNorm"]["step_norm"] is True
    assert g["SoftCFG w/ StepNorm"]["guidance_scale"] == 13 and g["SoftCFG tuned (V)"]["guidance_scale"] == 9
    assert [g[m]["softcfg_target"] for m in ("SoftCFG tuned (V)", "SoftCFG tuned, K only",
                                             "SoftCFG tuned, K and V")] == ["v", "k", "kv"]
    assert g["SoftCFG tuned, confidence=max"]["softcfg_confidence"] == "max"
    assert g["SoftCFG tuned, align=token"]["softcfg_align"] == "token"
    # CFG and SoftCFG tuned are table 1's seed-0 runs
    check_reuse(res, list(rows.values()), before, smoke_results / "table1_alitok", shared=2)
    assert not rows["SoftCFG tuned, K only"]["reused"]["sampling"]
    md = (smoke_results / "ablation_alitok_xl" / "results.md").read_text()
    assert md.index("No guidance") < md.index("| CFG") < md.index("w/o StepNorm") < md.index("align=token")


@pytest.mark.e2e
@pytest.mark.skipif(not (ROOT / "tests/configs/rar_tiny.yaml").is_file(), reason="tests/configs/rar_tiny.yaml missing")
def test_table_rar_smoke(smoke_results):
    smoke("table_rar.sh", smoke_results, "l")
    rows = {r["method"]: r for r in rows_of(smoke_results / "table_rar")}
    assert set(rows) == {"CFG", "SoftCFG"}
    for row in rows.values():
        check_row(row)
        assert row["model"] == "rar_l" and row["config"] == "tests/configs/rar_tiny.yaml"
    # SMOKE swaps the networks but keeps the real settings: configs/rar_l.yaml's CFG, the paper's SoftCFG
    cfg, soft = rows["CFG"]["guidance"], rows["SoftCFG"]["guidance"]
    assert (cfg["guidance_scale"], cfg["guidance_scale_pow"], cfg["randomize_temperature"]) == (15.5, 2.5, 1.02)
    assert (soft["guidance_scale"], soft["guidance_scale_pow"], soft["softcfg_strength"]) == (6.5, 1.01, 1.0)
    assert soft["randomize_temperature"] == 1.02
    assert "| rar_l (SMOKE) | SoftCFG |" in (smoke_results / "table_rar" / "results.md").read_text()


@pytest.mark.e2e
def test_sweep_smoke_grid_table_and_plot(smoke_results):
    from PIL import Image
    before = evaluated_runs(smoke_results)
    res = smoke("sweep.sh", smoke_results, SCALES="9 13", POWS="1.4")
    rows = rows_of(smoke_results / "sweep_alitok_xl")
    grid = sorted((r["method"], r["guidance"]["guidance_scale"], r["guidance"]["guidance_scale_pow"]) for r in rows)
    assert grid == [("CFG", 9.0, 1.4), ("CFG", 13.0, 1.4), ("SoftCFG", 9.0, 1.4), ("SoftCFG", 13.0, 1.4)]
    for row in rows:
        check_row(row)
    check_reuse(res, rows, before, smoke_results / "ablation_alitok_xl", shared=2)  # 13/1.4, both methods
    image = Image.open(smoke_results / "sweep_alitok_xl" / "sweep.png")
    assert "SMOKE" in image.text["Title"] and image.size[0] > 600
    assert "NOT real FID" in (smoke_results / "sweep_alitok_xl" / "results.md").read_text()


@pytest.mark.e2e
def test_search_guidance_smoke_grid_confirmation_and_noise_floor(smoke_results):
    # Run after the sweep: its four (scale, strength) points at k = 1.4 are this grid, reused.
    before = evaluated_runs(smoke_results)
    res = smoke("search_guidance.sh", smoke_results, "alitok_xl", POW="1.4")
    grid = rows_of(smoke_results / "search_alitok_xl")
    assert sorted((r["method"], r["guidance"]["guidance_scale"], r["guidance"]["softcfg_strength"]) for r in grid) \
        == [("CFG", 9.0, 0.0), ("CFG", 13.0, 0.0), ("SoftCFG", 9.0, 1.0), ("SoftCFG", 13.0, 1.0)]
    if (smoke_results / "sweep_alitok_xl").is_dir():
        assert all(r["run"] in before for r in grid)
    confirm = {r["method"]: r for r in rows_of(smoke_results / "search_alitok_xl_confirm")}
    for row in [*grid, *confirm.values()]:
        check_row(row)
    best = {m: min((r for r in grid if r["method"] == m), key=lambda r: r["metrics"]["fid"]) for m in confirm}
    for method, row in confirm.items():  # the proxy's best point (SMOKE: same N and seed, so the same run)
        assert row["guidance"] == best[method]["guidance"] and row["run"] == best[method]["run"]
        assert row["reused"]["sampling"] and res.stdout.count("reusing the samples and evaluation") >= 2
    summary = (smoke_results / "search_alitok_xl" / "summary.md").read_text()
    assert "NOT real FID" in summary and "noise floor: one proxy run's bootstrap std of FID is ±" in summary
    soft_line = next(line for line in summary.splitlines() if line.startswith("| alitok_xl (SMOKE) | SoftCFG"))
    assert re.search(r"\| [+-][\d.]+ \([+-][\d.]+ to [+-][\d.]+\), p = ", soft_line)
    assert (smoke_results / "search_alitok_xl" / "sweep.png").is_file() and "best on the proxy grid" in res.stdout
