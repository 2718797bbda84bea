"""Where code sits (issue 21): the import graph of every module of the project, read from the
source, has no cycle, and the model families and the evaluator never import the runner."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("softcfg_patch", "alitok", "rar", "llamagen", "evaluations", "demo")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """Project modules that `name` imports anywhere in its source (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name: its deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] (depth-first search, colouring nodes)."""
    state, stack = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_import_graph_is_read_from_the_source():
    edges = graph()
    assert "softcfg_patch.hf.cache" in edges["softcfg_patch.hf"]  # the package re-exports its modules
    assert edges["softcfg_patch.hf.unbatched"] >= {"softcfg_patch.hf.cache", "softcfg_patch.hf.generate"}
    assert "softcfg_patch.run.lock" in edges["softcfg_patch.run.runner"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_models_and_the_evaluator_never_import_the_runner():
    edges = graph()
    for name, targets in edges.items():
        # <family>/sample_imagenet.py is the family's command line: wiring it to the runner is its job
        if name.split(".")[0] in ("alitok", "rar", "llamagen", "evaluations") and not name.endswith(".sample_imagenet"):
            runner = sorted(t for t in targets if t == "softcfg_patch.run" or t.startswith("softcfg_patch.run."))
            assert not runner, f"{name} imports {runner}"
