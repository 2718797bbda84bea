"""The package as pip sees it: metadata that tells the truth, and a built wheel that works
from an empty folder in a fresh virtual environment (configs and demo weights inside)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = ("softcfg-sample", "softcfg-evaluate", "softcfg-compare", "softcfg-download", "softcfg-demo")


def test_metadata_declares_what_the_code_imports_and_needs():
    project = PYPROJECT["project"]
    names = {d.split(">")[0].split("=")[0].split(";")[0].strip().lower() for d in project["dependencies"]}
    assert {"torch", "omegaconf", "pyyaml", "numpy", "safetensors", "tqdm"} <= names
    assert project["requires-python"] == ">=3.10"  # torch 2.13's floor
    assert sys.version_info >= (3, 10)
    assert set(project["scripts"]) == set(COMMANDS)


def test_every_console_script_names_a_function_that_exists():
    import importlib
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_the_version_is_one_string():
    import softcfg_patch
    from softcfg_patch.run import manifest
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "softcfg_patch.__version__"}
    assert manifest.project_version() == softcfg_patch.__version__
    assert softcfg_patch.__version__.count(".") == 2


def test_packaged_configs_are_every_config_of_the_repository():
    from softcfg_patch.run.config import CONFIG_DIR, resolve_config_path
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert resolve_config_path("alitok_xl") == (CONFIG_DIR / "alitok_xl.yaml").resolve()


def test_softcfg_sample_reads_the_family_from_the_config(capsys):
    from softcfg_patch.run.config import family_of_config
    from softcfg_patch.run.runner import sample_command
    assert family_of_config("rar_xl").name == "rar"
    assert family_of_config(str(ROOT / "tests/configs/llamagen_tiny.yaml")).name == "llamagen"
    assert family_of_config("configs/digits.yaml").name == "alitok"  # by its architecture keys
    with pytest.raises(SystemExit) as stop:
        sample_command(["--config", "rar_xl", "--help"])
    assert stop.value.code == 0 and "model.generator.intermediate_size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        sample_command([])
    assert stop.value.code == 2 and "alitok_xl" in capsys.readouterr().err


def source_tree(dest: Path) -> Path:
    """The files git would ship (a build writes build/ next to its sources, so build a copy)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    files = listed.stdout.split() if listed.returncode == 0 else []
    if not files:
        pytest.skip("needs a git checkout to know which files to build from")
    for name in files:
        if name.startswith(("tests/", "docs/", "benchmarks/")) or not (ROOT / name).exists():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            os.symlink(os.readlink(ROOT / name), target)
        else:
            shutil.copy2(ROOT / name, target)
    return dest


@pytest.mark.e2e
def test_a_built_wheel_runs_the_demo_and_the_sampler_from_an_empty_folder(tmp_path):
    src = source_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", wheels, src], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel, = wheels.glob("softcfg-*.whl")
    # system site packages give torch and the other dependencies without a download; the
    # venv's own site-packages come first, so the code that runs is the wheel's
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheel],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["OMP_NUM_THREADS"] = "1"

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], cwd=empty, env=env, capture_output=True, text=True, timeout=300)

    where = run(python, "-c", "import softcfg_patch, demo; print(softcfg_patch.__file__); print(demo.__file__)")
    assert where.returncode == 0 and all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout
    demo = run(python, "-m", "demo", "--quick", "--out", "out")
    assert demo.returncode == 0, demo.stderr
    assert (empty / "out" / "results.json").is_file() and (empty / "out" / "comparison.png").is_file()
    sample_help = run(bin_dir / "softcfg-sample", "--config", "alitok_xl", "--help")
    assert sample_help.returncode == 0 and "model.generator.softcfg_strength" in sample_help.stdout, sample_help.stderr
    for command in COMMANDS[1:]:
        assert (bin_dir / command).is_file(), command
    missing = run(bin_dir / "softcfg-sample", "--config", "alitok_xl", "--experiment.output_dir=o")
    assert missing.returncode == 2 and "alitok_xl.bin" in missing.stderr and "Traceback" not in missing.stderr
