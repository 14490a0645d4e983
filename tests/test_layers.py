"""The package's shape (issue 22): layers that import only downwards (import-linter's contract in pyproject.toml),
no import circle between any two modules (lazy imports inside functions included), and no private name imported
from another module; no module over 400 lines, no function over 60."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

grimp = pytest.importorskip("grimp")  # import-linter's own graph builder (pip install import-linter)


def _graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("dlbase", cache_dir=None)
    return {m: {x for x in graph.find_modules_directly_imported_by(m) if x.startswith("dlbase")}
            for m in graph.modules if m.startswith("dlbase")}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_circle_finder_finds_circles():
    """Its own oracle: a hand-made graph with one circle of three and one of two, and a tail."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(circles(edges)) == [["a", "b", "c"], ["d", "e"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_in_a_circle():
    assert circles(_graph()) == []


def test_the_layers_contract_holds():
    """lint-imports with pyproject.toml's layers contract: cli > tools > search > population > training > core."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    r = subprocess.run([exe], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for path in sorted((REPO / "dlbase").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dlbase"):
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: {a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, bad


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60  # past these a module holds two ideas, a function two steps


def test_no_module_or_function_outgrows_one_idea():
    big = []
    for path in sorted((REPO / "dlbase").rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(REPO)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{where}: {len(source.splitlines())} lines")
        big += [f"{where}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines" for f in ast.walk(ast.parse(source))
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not big, big
