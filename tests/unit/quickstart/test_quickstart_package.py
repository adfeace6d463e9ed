"""The quickstart package's shape: imports between its modules form no cycle, and the steps never import
the run order or the report (they measure; ``results_report`` only formats)."""

from __future__ import annotations

import ast
from pathlib import Path

import umt_distill.quickstart as quickstart

PACKAGE = "umt_distill.quickstart"
FOLDER = Path(quickstart.__file__).parent


def package_imports(source: str, module: str) -> set[str]:
    """Modules of the package that ``source`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join([*module.split(".")[:-node.level], node.module])
            if base == PACKAGE:  # ``from umt_distill.quickstart import x``: x may be a submodule
                found |= {f"{PACKAGE}.{a.name}" if (FOLDER / f"{a.name}.py").exists() else PACKAGE for a in node.names}
            elif base.startswith(PACKAGE + "."):
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PACKAGE)}
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(FOLDER.glob("*.py")):
        name = PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
        graph[name] = package_imports(path.read_text(encoding="utf-8"), name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_quickstart_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {f"{PACKAGE}.{m}" for m in ("run", "results_report", "finetune", "stage2", "probes")} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    for module, imports in graph.items():  # only __init__ re-exports; nothing inside imports the package root
        assert module == PACKAGE or PACKAGE not in imports, module


def test_steps_import_neither_the_run_order_nor_the_report() -> None:
    graph = import_graph()
    for module, imports in graph.items():
        if module not in (PACKAGE, f"{PACKAGE}.run"):
            assert f"{PACKAGE}.run" not in imports, module
        if module not in (PACKAGE, f"{PACKAGE}.run", f"{PACKAGE}.results_report"):
            assert f"{PACKAGE}.results_report" not in imports, module


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert package_imports("def f():\n    from umt_distill.quickstart import run\n", f"{PACKAGE}.x") == {f"{PACKAGE}.run"}
