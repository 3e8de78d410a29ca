"""The backends package's import graph: the protocol never imports a runtime."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "convoy" / "backends"


def _imports(path: Path) -> set[str]:
    """The sibling modules one file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack = [(start, [start])]
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, set()):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_of_the_backends_package_imports_itself_back() -> None:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    cycles = [c for m in sorted(graph) if (c := _cycle_from(m, graph))]
    assert not cycles, f"import cycles: {cycles}"


def test_callers_keep_the_package_names() -> None:
    import convoy.backends as backends
    from convoy.backends import factory

    assert backends.load_backend is factory.load_backend
    assert backends.probe_signature is factory.probe_signature
