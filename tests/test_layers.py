"""The package imports one way: no import circle in mucs/ (every import statement counts, also those inside
functions), the entry-point layer (mucs.cli) imported by nothing in the library, stages registered without the
registry importing them, and the orchestration modules small enough to read."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def import_graph(root, package="mucs"):
    """{module: {modules of the package it imports}} from the source files under root/package."""
    files = {}
    for p in (root / package).rglob("*.py"):
        parts = p.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, path in files.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 folders
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                # `from mucs import config` imports the module mucs.config (the package's __init__ is only a facade)
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        deps = set()
        for d in found:
            while d and d not in files:  # `from mucs.io import save_tensors` -> mucs.io
                d = d.rpartition(".")[0]
            if d and d != name:
                deps.add(d)
        graph[name] = deps
    return graph


def cycles(graph):
    """Every import circle, as the sorted modules of each strongly connected component with more than one."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a as a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_no_import_circle_in_mucs():
    assert cycles(import_graph(ROOT)) == []


@pytest.mark.parametrize("module, must_not_import", [
    ("mucs.stages", {"mucs.lds", "mucs.logo", "mucs.runner", "mucs.manifest", "mucs.launch", "mucs.cli"}),
    ("mucs.launch", {"mucs.cli"}),
    ("mucs.evaluation", {"mucs.cli"}),
    ("mucs.logo", {"mucs.cli", "mucs.runner", "mucs.launch"}),
    ("mucs.lds", {"mucs.cli", "mucs.runner", "mucs.launch"}),
])
def test_layers_point_one_way(module, must_not_import):
    assert not import_graph(ROOT)[module] & must_not_import


def test_only_entry_points_import_the_command_line():
    users = {m for m, deps in import_graph(ROOT).items() if "mucs.cli" in deps}
    assert users <= {"mucs.reporting"}, users  # report.py's own command line


@pytest.mark.parametrize("name", ["stages.py", "launch.py"])
def test_orchestration_modules_stay_small(name):
    assert len((ROOT / "mucs" / name).read_text().splitlines()) <= 350
