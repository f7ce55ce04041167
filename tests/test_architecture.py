"""The layout others build on: floors that import only downwards, no circles, one backend interface, small files."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
from importlinter import cli as importlinter_cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mechfix"
BACKENDS = PACKAGE / "engine" / "backends"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_contracts_in_pyproject_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert importlinter_cli.lint_imports(no_cache=True) == importlinter_cli.EXIT_STATUS_SUCCESS


def test_no_module_imports_one_that_imports_it_back_not_even_inside_a_function():
    graph = grimp.build_graph("mechfix", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    # Tarjan's strongly connected components: any component of two or more modules is an import circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[set[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            part = set()
            while True:
                n = stack.pop()
                on_stack.discard(n)
                part.add(n)
                if n == m:
                    break
            if len(part) > 1:
                circles.append(part)

    for m in sorted(edges):
        if m not in index:
            visit(m)
    assert circles == []
    # The check sees imports inside functions (it is not blind to the kind it must catch).
    assert "mechfix.stages.pipeline" in edges["mechfix.cli.run"]


def _compared_names(tree: ast.AST) -> list[str]:
    """Every comparison with a backend's name in it: ``x.backend == ...`` or a backend name as a literal."""
    from mechfix.engine.backends import BACKENDS as registry

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(isinstance(p, ast.Attribute) and p.attr == "backend" for p in parts) or any(
                    isinstance(p, ast.Constant) and p.value in registry for p in parts):
                found.append(ast.unparse(node))
    return found


def test_no_code_outside_the_backends_asks_which_backend_it_runs_on():
    asked = {str(p.relative_to(ROOT)): _compared_names(ast.parse(p.read_text())) for p in _modules()
             if BACKENDS not in p.parents}
    assert {k: v for k, v in asked.items() if v} == {}
    # The scan finds such a comparison where one is written.
    assert _compared_names(ast.parse("if lm.backend == 'nnsight':\n    pass")) == ["lm.backend == 'nnsight'"]


def test_only_the_backend_registry_is_imported_from_outside_the_backends():
    graph = grimp.build_graph("mechfix", cache_dir=None)
    inner = {m for m in graph.modules if m.startswith("mechfix.engine.backends.")}
    outside = {m for m in graph.modules if not m.startswith("mechfix.engine.backends")}
    reached = {(m, n) for m in outside for n in graph.find_modules_directly_imported_by(m) if n in inner}
    assert reached == set()


def test_the_package_keeps_at_most_twelve_modules_at_its_top_and_no_file_over_700_lines():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 700}
    assert long == {}


def test_no_command_module_imports_a_private_name_from_another_module():
    private = []
    for p in (PACKAGE / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mechfix"):
                private += [f"{p.name}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []
