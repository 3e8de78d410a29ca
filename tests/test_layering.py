"""Dependencies point one way (STYLE.md): doors -> inference path -> batching -> scheduling ->
backends, with config, errors and tensors on the ground floor. Read from the source with ast,
imports inside functions included: a late import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "convoy"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The convoy modules one file imports (absolute names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("convoy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("convoy"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if "pb" not in p.parts}


def importers(prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def reaches(deps: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(d for d in deps if any(d == p or d.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize(
    ("floor", "above"),
    [
        # the ground floor: typed config, errors, tensor types
        ("convoy.config", ("convoy.cache", "convoy.batching", "convoy.repository", "convoy.api")),
        ("convoy.tensors", ("convoy.batching", "convoy.backends", "convoy.config")),
        # backends know nothing of the batcher, the doors or the inference path
        (
            "convoy.backends",
            ("convoy.batching", "convoy.api", "convoy.workers", "convoy.inference"),
        ),
        # the batcher never reaches a door or the inference path
        ("convoy.batching", ("convoy.api", "convoy.workers", "convoy.inference", "convoy.cli")),
        ("convoy.scheduling", ("convoy.api", "convoy.workers", "convoy.inference")),
        # the repository (ensembles too) is below the inference path, which it is handed
        ("convoy.repository", ("convoy.api", "convoy.workers", "convoy.inference")),
        # sub-commands never import the command line that imports them
        ("convoy.optimize", ("convoy.cli",)),
        ("convoy.rollouts", ("convoy.cli", "convoy.api")),
        ("convoy.monitoring", ("convoy.cli",)),
        # capture and replay go through the inference path, never a door
        ("convoy.capture", ("convoy.cli", "convoy.api", "convoy.workers")),
        # feature lookups sit in front of a backend; skew reads captures, never a door
        ("convoy.features", ("convoy.cli", "convoy.api", "convoy.workers", "convoy.inference")),
        # batch jobs too (DESIGN §11): the inference path in process, or a server's wire
        ("convoy.batch", ("convoy.cli", "convoy.api", "convoy.workers")),
    ],
)
def test_dependencies_point_down(floor: str, above: tuple[str, ...]) -> None:
    wrong = {m: reaches(deps, above) for m, deps in importers(floor).items()}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_the_inference_path_imports_no_transport() -> None:
    """grpc and aiohttp stay at the doors: the path takes a request and a caller."""
    for path in (PACKAGE / "inference").rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in modules if m.split(".")[0] in ("grpc", "aiohttp", "zmq")}, path
