"""The package's floor plan: a module imports only its own layer and those below, and no import cycle
exists, counting imports inside functions (DESIGN: ground → models, teachers → data, training → cache →
evaluation → stages → testing → quickstart → cli). A failure names both modules.

``umt_distill.testing`` (media generators for tests, benchmarks and the quickstart's toy world) has a
layer of its own above every library layer, so no library module can come to depend on test media,
and below the quickstart, whose world encodes its clips with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "umt_distill"

# Bottom to top; a module's layer is that of its longest listed prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("umt_distill", "umt_distill.registry", "umt_distill.config", "umt_distill.io", "umt_distill.masking",
     "umt_distill.losses"),
    ("umt_distill.models", "umt_distill.teachers"),
    ("umt_distill.data", "umt_distill.training"),
    ("umt_distill.cache",),
    ("umt_distill.evaluation",),
    ("umt_distill.stages",),
    ("umt_distill.testing",),
    ("umt_distill.quickstart",),
    ("umt_distill.cli", "umt_distill.__main__"),
)


def layer_of(module: str) -> int:
    best, found = -1, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), rank
    if found < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/unit/test_layers.py")
    return found


def module_files(root: Path) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """Internal modules ``name`` imports (anywhere in the file) → the line of the first such import."""
    found: dict[str, int] = {}
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(name + "."):
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    mods = module_files(root)
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [f"{src}:{line} imports {dst} (layer {layer_of(dst)} is above layer {layer_of(src)})"
            for src, targets in sorted(graph.items()) for dst, line in sorted(targets.items())
            if layer_of(dst) > layer_of(src)]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_a_higher_layer() -> None:
    problems = upward_imports(import_graph(PACKAGE))
    assert not problems, "upward imports:\n  " + "\n  ".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "umt_distill"
    for sub in ("models", "stages"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "vit.py").write_text("def build():\n    from umt_distill.stages.loop import train\n")
    (pkg / "stages" / "loop.py").write_text("from umt_distill.models.vit import build\n")
    graph = import_graph(pkg)
    assert upward_imports(graph) == [
        "umt_distill.models.vit:2 imports umt_distill.stages.loop (layer 5 is above layer 1)"]
    assert cycles(graph) == [["umt_distill.models.vit", "umt_distill.stages.loop"]]


def test_every_module_has_a_layer() -> None:
    for name in module_files(PACKAGE):
        layer_of(name)  # raises naming the module


@pytest.mark.parametrize("name", ["umt_distill.cache.codecs", "umt_distill.losses"])
def test_layer_of_takes_the_longest_prefix(name: str) -> None:
    assert layer_of(name) == {"umt_distill.cache.codecs": 3, "umt_distill.losses": 0}[name]
