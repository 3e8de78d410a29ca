"""Issue 15: `convoy optimize` as an operator runs it, on a copy of the built-in CNN:
the new versions are written with their reports, load in a real server and serve
(each request pins its version); bad arguments are refused by name, exit status 2,
with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from .conftest import ROOT, ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

MODEL = "image_classifier"
FAST = ("--bench-seconds", "0.05", "--sample-rows", "16")  # agreement, not speed, is checked
FP16, INT8 = 2, 3


def _optimize(*args: str | int | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convoy.cli", "optimize", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Path:
    """A CNN copy (model file linked, not copied) that serves every version it has."""
    root = make_repository(tmp_path_factory.mktemp("optimize"), examples_dir, (MODEL,))
    config = root / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all { } }\n")
    return root


@pytest.fixture(scope="module")
def optimized(repo: Path) -> dict[int, subprocess.CompletedProcess[str]]:
    model_dir = repo / MODEL
    runs = {
        FP16: _optimize(model_dir, "--from-version", "1", "--to-version", FP16, "--fp16", *FAST),
        INT8: _optimize(model_dir, "--from-version", "1", "--to-version", INT8, "--int8", *FAST),
    }
    for version, run in runs.items():
        assert run.returncode == 0, f"version {version}: {run.stderr}"
    return runs


@pytest.fixture(scope="module")
def served(
    repo: Path, optimized: dict[int, subprocess.CompletedProcess[str]]
) -> Iterator[ServerProcess]:
    proc = start_server(repo)
    yield proc
    proc.stop()


def _report(repo: Path, version: int) -> dict[str, Any]:
    report = json.loads((repo / MODEL / str(version) / "optimize_report.json").read_text())
    assert isinstance(report, dict)
    return report


@pytest.mark.parametrize(
    ("version", "mode", "min_cosine", "min_top1", "max_size"),
    [(FP16, "fp16", 0.999, 0.99, 0.55), (INT8, "int8-dynamic", 0.95, 0.95, 0.35)],
)
def test_the_report_is_saved_with_its_agreement(
    repo: Path,
    optimized: dict[int, subprocess.CompletedProcess[str]],
    version: int,
    mode: str,
    min_cosine: float,
    min_top1: float,
    max_size: float,
) -> None:
    target = repo / MODEL / str(version)
    assert (target / "model.onnx").is_file() and not (target / "model.onnx").is_symlink()
    report = _report(repo, version)
    assert (report["model"], report["mode"], report["passed"]) == (MODEL, mode, True)
    assert report["failures"] == []
    assert report["floors"] == {"min_cosine": min_cosine, "top1": min_top1}
    (row,) = report["agreement"]
    assert row["output"] == "LOGITS"
    assert row["min_cosine"] >= min_cosine and row["mean_cosine"] >= row["min_cosine"]
    assert row["top1_agreement"] >= min_top1  # the documented floor
    assert 0 < row["max_abs_diff"] < 0.01  # converted (not a copy), and close
    before, after = report["from_version"], report["to_version"]
    assert (before["version"], after["version"]) == (1, version)
    assert after["model_bytes"] < max_size * before["model_bytes"]
    for figures in (before, after):
        assert figures["batch1"]["batch"] == 1 and figures["max_batch"]["batch"] == 64
        assert figures["batch1"]["rows_per_s"] > 0 and figures["max_batch"]["rows_per_s"] > 0
    # Printed on stdout as saved beside the model; no staging directory is left behind.
    assert optimized[version].stdout == (target / "optimize_report.txt").read_text()
    assert "floors (" in optimized[version].stdout and "passed" in optimized[version].stdout
    assert not [p for p in (repo / MODEL).iterdir() if p.name.startswith(".")]


def test_the_new_versions_load_and_serve(served: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(served.url)
    image = np.random.default_rng(15).random((4, 3, 64, 64), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    logits = {}
    for version in (1, FP16, INT8):
        assert client.is_model_ready(MODEL, str(version))
        result = client.infer(MODEL, [tensor], model_version=str(version))
        assert result.get_response().model_version == str(version)
        answer = result.as_numpy("LOGITS")
        assert answer is not None and answer.dtype == np.float32 and answer.shape == (4, 1000)
        logits[version] = answer
    assert not np.array_equal(logits[FP16], logits[1])  # each version ran its own file
    np.testing.assert_allclose(logits[FP16], logits[1], atol=1e-3)
    np.testing.assert_allclose(logits[INT8], logits[1], atol=1e-2)
    client.close()


def _listing(model_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(model_dir)): p.stat().st_mtime_ns for p in model_dir.rglob("*")}


def _refused(model_dir: Path, reason: str, *args: str | int | Path) -> str:
    before = _listing(model_dir)
    run = _optimize(model_dir, *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"refused ({reason}): " in run.stderr
    assert run.stdout == ""
    assert _listing(model_dir) == before  # nothing written, nothing left behind
    return run.stderr


def test_bad_arguments_are_refused_by_name(
    repo: Path, optimized: dict[int, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    model_dir = repo / MODEL
    err = _refused(
        model_dir, "missing_version", "--from-version", "7", "--to-version", "8", "--fp16"
    )
    assert "version 7" in err
    err = _refused(
        model_dir, "target_exists", "--from-version", "1", "--to-version", FP16, "--int8"
    )
    assert "--force" in err
    _refused(model_dir, "same_version", "--from-version", "1", "--to-version", "1", "--fp16")
    _refused(model_dir, "bad_version", "--from-version", "0", "--to-version", "9", "--fp16")
    wrong = tmp_path / "calib.npz"
    np.savez(wrong, IMAGE=np.zeros((4, 3, 64, 64), np.float32))  # the input is INPUT
    _refused(
        model_dir, "calibration_mismatch", "--from-version", "1", "--to-version", "9", "--int8",
        "--calibration", wrong,
    )  # fmt: skip

    python_model = tmp_path / "echo"
    (python_model / "1").mkdir(parents=True)
    (python_model / "1" / "model.py").write_text("class Model: ...\n")
    (python_model / "config.pbtxt").write_text(
        'name: "echo"\nbackend: "convoy_python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    err = _refused(
        python_model, "unsupported_backend", "--from-version", "1", "--to-version", "2", "--int8"
    )
    assert "convoy_python" in err
    _refused(tmp_path, "not_a_model", "--from-version", "1", "--to-version", "2", "--int8")


def test_a_precision_must_be_chosen(repo: Path) -> None:
    run = _optimize(repo / MODEL, "--from-version", "1", "--to-version", "9")
    assert run.returncode == 2 and "one of the arguments --fp16 --int8 is required" in run.stderr
