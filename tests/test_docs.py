"""README.md and docs/*.md: every link resolves, every file:line anchor names what is on
that line, and every command is checked: shell blocks parse, the files they name exist,
sampler commands parse through the sampler's own CLI, and every option a documented
Python script is given appears in that script's --help."""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR = re.compile(r"\[`([\w/.]+\.py):(\d+)`\]\(([^)]+)\)\s+`([\w.]+)`")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def heading_slugs(text: str) -> set:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens."""
    slugs = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return slugs


def blocks(kind: str) -> list:
    """(page, code) for every fenced block of this language (bash: also the 4-space
    indented command lines of the README's demo section)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        found += [(page, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == kind]
        if kind == "bash":
            indented = [line[4:] for line in text.splitlines() if re.match(r"    (python|torchrun) ", line)]
            if indented:
                found.append((page, "\n".join(indented) + "\n"))
    return found


def commands(code: str) -> list:
    """Shell commands of a block as argv lists: continuation lines joined, comments and
    `A && B` split, environment assignments dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words:
                out.append(words)
    return out


# ----------------------------------------------------------------------------- links
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_resolves(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page_id(page)}: link to {target!r}: {resolved} does not exist"
        if fragment.startswith("L") and fragment[1:].isdigit():
            assert int(fragment[1:]) <= len(resolved.read_text().splitlines()), f"{page_id(page)}: {target}"
        elif fragment:
            assert fragment in heading_slugs(resolved.read_text()), \
                f"{page_id(page)}: link to {target!r}: no heading with anchor #{fragment}"


def test_the_docs_table_links_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_design_walkthrough_anchors_name_what_is_on_their_line():
    text = (ROOT / "docs/design.md").read_text()
    anchors = ANCHOR.findall(text)
    assert len(anchors) >= 20
    for path, line, link, name in anchors:
        assert link == f"../{path}#L{line}", f"docs/design.md: {path}:{line} links to {link}"
        source = (ROOT / path).read_text().splitlines()
        definition = source[int(line) - 1]
        short = name.split(".")[-1]
        assert re.match(rf"\s*(def|class) {re.escape(short)}\b", definition), \
            f"docs/design.md: {path}:{line} should define {name}; the line is {definition.strip()!r}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


# ----------------------------------------------------------------------------- commands
@pytest.mark.parametrize("page, code", blocks("bash"), ids=lambda x: page_id(x) if isinstance(x, Path) else "")
def test_shell_blocks_parse_and_name_files_that_exist(page, code):
    result = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert result.returncode == 0, f"{page_id(page)}: {result.stderr}"
    for argv in commands(code):
        for word in argv:
            value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
            if re.match(r"^(scripts|configs|alitok|rar|llamagen|evaluations|benchmarks|demo)/[\w./-]+\.(py|sh|yaml)$",
                        value):
                assert (ROOT / value).is_file(), f"{page_id(page)}: {value} does not exist"


def sampler_commands() -> list:
    found = []
    for page, code in blocks("bash"):
        for argv in commands(code):
            scripts = [w for w in argv if w.endswith("/sample_imagenet.py") or w == "softcfg-sample"]
            if scripts and "..." not in argv:
                found.append((page, scripts[0].split("/")[0], argv[argv.index(scripts[0]) + 1:]))
    return found


@pytest.mark.parametrize("page, family, argv", sampler_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_sampler_commands_parse_through_the_sampler_cli(page, family, argv):
    from softcfg_patch.run.config import _split_args, family_of_config, parse_cli
    if family == "softcfg-sample":  # the command reads the family from the config
        family = family_of_config(_split_args(argv)[0]).name
    config = parse_cli(argv, family)  # every key known, every value of the right type, guidance valid
    assert config.experiment.output_dir


def script_commands() -> list:
    """(page, script, options) for `python <script>.py ...` commands of the docs."""
    found = []
    for page, code in blocks("bash"):
        for argv in commands(code):
            if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
                found.append((page, argv[1], [w.split("=")[0] for w in argv[2:] if w.startswith("--")]))
    return found


@pytest.mark.parametrize("page, script, options", script_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_script_options_in_the_docs_exist(page, script, options, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code in (0, None)
    for option in options:
        assert option in help_text.getvalue(), f"{page_id(page)}: {script} has no option {option}"


@pytest.mark.parametrize("page, code", blocks("python"), ids=lambda x: page_id(x) if isinstance(x, Path) else "")
def test_python_blocks_compile_and_import_what_they_name(page, code):
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = import_or_skip(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page_id(page)}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                import_or_skip(alias.name)


def import_or_skip(name: str):
    """Import `name`; skip when what is missing is an optional extra (transformers: [hf])."""
    try:
        return importlib.import_module(name)
    except ImportError as err:  # softcfg_patch.hf says "needs the optional extra" itself
        if err.name in ("transformers", "wandb") or "optional extra" in str(err):
            pytest.skip(f"an optional extra is not installed: {err}")
        raise


def test_the_readme_api_example_runs_on_the_tiny_model(tmp_path):
    """The README's example, with the tiny golden config and weights for the XL ones."""
    (page, code), = [(p, c) for p, c in blocks("python") if p.name == "README.md"]
    code = code.replace("configs/alitok_xl.yaml", str(ROOT / "tests/configs/alitok_tiny.yaml"))
    code = code.replace("weights/alitok_xl.bin", str(ROOT / "tests/fixtures/alitok_ar_tiny_weights.safetensors"))
    code = code.replace("[207, 980]", "[1, 2]")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    import torch
    model = scope["model"]
    assert scope["tokens"].shape == (2, model.num_image_tokens)
    assert scope["logits"].shape == (2, model.num_image_tokens, model.vocab_size)
    # teacher forcing on the sampled tokens gives the softmax inputs they were drawn from
    picked = scope["logits"].log_softmax(-1).gather(-1, scope["tokens"][..., None])
    assert torch.isfinite(picked).all()


def download_commands() -> list:
    return [(page, argv[1:]) for page, code in blocks("bash") for argv in commands(code)
            if argv[0] == "softcfg-download" and "--mirror" not in argv]


@pytest.mark.parametrize("page, argv", download_commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_download_commands_of_the_docs_run_as_dry_runs(page, argv, tmp_path, capsys):
    from softcfg_patch import download
    argv = [a for a in argv if a != "--dry-run"]
    assert download.main(argv + ["--dry-run", "--dir", str(tmp_path)]) == 0, capsys.readouterr().err
    assert "to fetch" in capsys.readouterr().out and not any(tmp_path.iterdir())  # a dry run writes nothing
