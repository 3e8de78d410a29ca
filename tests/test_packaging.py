"""What Convoy installs is one import package, `convoy`, and nothing in the checkout shadows
another distribution's package (issue 24: the checkout's top-level `kernels/` hid Hugging Face's
`kernels`, which transformers imports, whenever the checkout was on sys.path)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, ServerProcess


def test_the_wheel_holds_only_the_convoy_package(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "convoy", source / "convoy", ignore=shutil.ignore_patterns("__pycache__")
    )
    # Built with the setuptools already here, as CI's editable install is: no index needed.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("convoy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
    top_level = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert top_level - dist_info == {"convoy"}
    # The package carries what it needs at run time: the kernels, the stubs' type hints.
    assert "convoy/kernels/classify.py" in names
    assert "convoy/pb/grpc_service_pb2.pyi" in names and "convoy/py.typed" in names
    assert re.search(r"^convoy = convoy\.cli:main$", entry_points, flags=re.M)


def test_no_top_level_name_in_the_checkout_but_convoy_tests_and_tools() -> None:
    """Each folder or module at the checkout's top is importable whenever the checkout is on
    sys.path (pytest puts it there): each one is a name another package could own."""
    importable = {
        p.name if p.is_dir() else p.stem
        for p in ROOT.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    }
    assert importable == {"convoy", "tests", "loadtests"}


def test_transformers_hub_kernels_import_with_the_checkout_first_on_sys_path() -> None:
    """transformers >= 5 imports Hugging Face's `kernels` package at import time."""
    pytest.importorskip("transformers", reason="transformers missing (the examples need it)")
    script = (
        "import sys, importlib.util\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "import transformers.integrations.hub_kernels as hub\n"
        "from sentence_transformers import SentenceTransformer\n"
        "import convoy.kernels.classify\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else 'none')\n"
        "print(getattr(hub, 'CUDAProperties', None) is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    origin, has_properties = done.stdout.split()
    assert not origin.startswith(str(ROOT)), origin
    if origin != "none":  # Hugging Face's kernels is installed: transformers uses it.
        assert has_properties == "True"


@pytest.mark.e2e
def test_the_readme_first_example_answers(server: ServerProcess) -> None:
    """README.md's "Using it" snippet, as a newcomer pastes it (the address aside)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert snippet, "README.md: no python block under 'Using it'"
    code = snippet.group(1)
    assert '"localhost:8001"' in code
    done = subprocess.run(
        [sys.executable, "-c", code.replace('"localhost:8001"', repr(server.url))],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "(1, 384)"
