"""`convoy optimize` on the built-in CNN and on small models built here: the new
version agrees with the original above the documented floors, loads in the server's
own backend and runs; every refusal names its reason."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convoy.backends.factory import load_backend
from convoy.config import CONFIG_FILENAME, read_model_config, validate_model_config
from convoy.optimize import OptimizeRefused, OptimizeReport, OptimizeRequest, optimize
from convoy.optimize.cli import add_optimize_parser, run_optimize
from tests.conftest import make_repository

FAST = {"bench_seconds": 0.05, "sample_rows": 32}

MLP_CONFIG = """\
name: "{name}"
platform: "{platform}"
max_batch_size: 16
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ 32 ] }} ]
output [ {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ 10 ] }} ]
"""


def _mlp() -> object:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def build_mlp(root: Path, kind: str) -> Path:
    """A small classifier MLP as TorchScript (`pytorch`) or ONNX (`onnx`), version 1."""
    import torch

    name = f"mlp_{kind}"
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True)
    platform = "pytorch_libtorch" if kind == "pytorch" else "onnxruntime_onnx"
    (model_dir / CONFIG_FILENAME).write_text(MLP_CONFIG.format(name=name, platform=platform))
    module = _mlp()
    if kind == "pytorch":
        torch.jit.script(module).save(str(model_dir / "1" / "model.pt"))
    else:
        torch.onnx.export(
            module,
            (torch.zeros(1, 32),),
            str(model_dir / "1" / "model.onnx"),
            input_names=["INPUT"],
            output_names=["LOGITS"],
            dynamic_axes={"INPUT": {0: "batch"}, "LOGITS": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return model_dir


def serve_once(model_dir: Path, version: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Load a version with the server's own backend factory and run one batch."""
    config = read_model_config(model_dir)
    spec = validate_model_config(config, str(model_dir / CONFIG_FILENAME), model_dir.name)
    path = model_dir / str(version) / spec.default_model_filename
    backend = load_backend(spec, path, "cpu", 1)
    try:
        return backend.run(inputs, spec.output_names)[spec.output_names[0]]
    finally:
        backend.close()


@pytest.fixture(scope="module")
def cnn(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repository(tmp_path_factory.mktemp("opt"), examples_dir, ("image_classifier",))
    return repo / "image_classifier"


@pytest.fixture(scope="module")
def cnn_fp16(cnn: Path) -> OptimizeReport:
    return optimize(OptimizeRequest(cnn, 1, 2, "fp16", **FAST))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cnn_int8(cnn: Path) -> OptimizeReport:
    # 64 rows: the floor then allows 3 flipped near-ties (measured: 1 of 64, 1 of 200 flips).
    return optimize(OptimizeRequest(cnn, 1, 3, "int8", sample_rows=64, bench_seconds=0.05))


def test_fp16_cnn_agrees_halves_the_file_and_serves(cnn: Path, cnn_fp16: OptimizeReport) -> None:
    (logits,) = cnn_fp16.agreement
    assert cnn_fp16.passed and cnn_fp16.mode == "fp16"
    assert logits.top1_agreement is not None and logits.top1_agreement >= 0.99
    assert logits.min_cosine >= 0.999 and logits.max_abs_diff < 1e-3
    assert cnn_fp16.to_version.model_bytes < 0.55 * cnn_fp16.from_version.model_bytes
    assert cnn_fp16.from_version.max_batch.batch == 64 and cnn_fp16.to_version.batch1.batch == 1
    saved = json.loads((cnn / "2" / "optimize_report.json").read_text())
    assert saved["passed"] and saved["agreement"][0]["output"] == "LOGITS"
    assert "top-1 1.0000" in (cnn / "2" / "optimize_report.txt").read_text()
    x = np.random.default_rng(5).standard_normal((4, 3, 64, 64)).astype(np.float32)
    before, after = serve_once(cnn, 1, {"INPUT": x}), serve_once(cnn, 2, {"INPUT": x})
    assert after.dtype == np.float32 and after.shape == (4, 1000)  # I/O stays FP32
    np.testing.assert_allclose(after, before, atol=1e-3)


def test_int8_cnn_agrees_above_its_floor_and_serves(cnn: Path, cnn_int8: OptimizeReport) -> None:
    (logits,) = cnn_int8.agreement
    assert cnn_int8.passed and cnn_int8.mode == "int8-dynamic"
    # Floor 0.95: the random-weight CNN's logits are near ties (measured 0.984).
    assert logits.top1_agreement is not None and logits.top1_agreement >= 0.95
    assert logits.min_cosine >= 0.95
    assert cnn_int8.to_version.model_bytes < 0.35 * cnn_int8.from_version.model_bytes
    x = np.random.default_rng(6).standard_normal((2, 3, 64, 64)).astype(np.float32)
    after = serve_once(cnn, 3, {"INPUT": x})
    assert after.shape == (2, 1000) and np.isfinite(after).all()


def test_torchscript_int8_quantizes_linear_layers_and_serves(tmp_path: Path) -> None:
    model_dir = build_mlp(tmp_path, "pytorch")
    report = optimize(OptimizeRequest(model_dir, 1, 2, "int8", **FAST))  # type: ignore[arg-type]
    assert report.passed and report.mode == "int8-dynamic"
    assert report.agreement[0].top1_agreement is not None
    assert report.agreement[0].top1_agreement >= 0.95
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    before, after = serve_once(model_dir, 1, {"INPUT": x}), serve_once(model_dir, 2, {"INPUT": x})
    assert not np.array_equal(before, after)  # really quantized, not a copy
    np.testing.assert_allclose(after, before, atol=0.05)


def test_static_int8_calibrates_on_the_npz_and_compares_on_it(tmp_path: Path) -> None:
    model_dir = build_mlp(tmp_path, "onnx")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, INPUT=np.random.default_rng(2).standard_normal((40, 32)).astype("f4"))
    request = OptimizeRequest(model_dir, 1, 2, "int8", calibration=calibration, bench_seconds=0.05)
    report = optimize(request)
    assert report.mode == "int8-static" and report.passed
    assert report.sample == "calibration file calib.npz (40 rows)"
    assert any("in-sample" in note for note in report.notes)
    out = serve_once(model_dir, 2, {"INPUT": np.ones((2, 32), np.float32)})
    assert out.shape == (2, 10)


def test_below_the_floors_nothing_is_installed(tmp_path: Path) -> None:
    model_dir = build_mlp(tmp_path, "pytorch")
    report = optimize(
        OptimizeRequest(model_dir, 1, 2, "int8", **FAST),  # type: ignore[arg-type]
        floors={"min_cosine": 1.01},
    )
    assert not report.passed and "min cosine" in report.failures[0]
    assert not (model_dir / "2").exists()
    assert {p.name for p in model_dir.iterdir()} == {"1", CONFIG_FILENAME}


def refusal(request: OptimizeRequest) -> str:
    with pytest.raises(OptimizeRefused) as caught:
        optimize(request)
    return caught.value.reason


def test_each_bad_argument_gets_its_named_reason(tmp_path: Path) -> None:
    mlp = build_mlp(tmp_path, "pytorch")
    python_model = tmp_path / "py"
    (python_model / "1").mkdir(parents=True)
    (python_model / CONFIG_FILENAME).write_text(
        MLP_CONFIG.format(name="py", platform="x").replace(
            'platform: "x"', 'backend: "convoy_python"'
        )
    )
    tiny = tmp_path / "tiny"
    from convoy.repository.examples import build_tiny

    build_tiny(tiny)

    def npz(name: str, **arrays: np.ndarray) -> Path:
        path = tmp_path / name
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path

    f32 = np.zeros((4, 32), np.float32)
    cases = {
        "unsupported_backend": OptimizeRequest(python_model, 1, 2, "int8"),
        "unsupported_precision": OptimizeRequest(mlp, 1, 2, "fp16"),
        "missing_version": OptimizeRequest(mlp, 7, 8, "int8"),
        "same_version": OptimizeRequest(mlp, 1, 1, "int8"),
        "target_exists": OptimizeRequest(mlp, 1, 3, "int8"),
        "not_a_model": OptimizeRequest(tmp_path / "nowhere", 1, 2, "int8"),
        "nothing_to_quantize": OptimizeRequest(tiny, 1, 2, "int8"),
    }
    (mlp / "3").mkdir()
    for reason, request in cases.items():
        assert refusal(request) == reason, reason
    mismatched = {
        "missing": npz("a.npz", OTHER=f32),
        "extra": npz("b.npz", INPUT=f32, MORE=f32),
        "dtype": npz("c.npz", INPUT=f32.astype(np.float64)),
        "shape": npz("d.npz", INPUT=np.zeros((4, 31), np.float32)),
        "rank": npz("e.npz", INPUT=np.zeros((32,), np.float32)),
        "absent": tmp_path / "absent.npz",
        "unreadable": tmp_path / "junk.npz",
    }
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for problem, path in mismatched.items():
        request = OptimizeRequest(mlp, 1, 2, "int8", calibration=path)
        assert refusal(request) == "calibration_mismatch", problem
    assert not (mlp / "2").exists() and not list(mlp.glob(".optimize-*"))


def test_the_cli_prints_refusals_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="convoy")
    add_optimize_parser(parser.add_subparsers(dest="command"))
    mlp = build_mlp(tmp_path, "pytorch")

    def cli(*argv: str) -> int:
        return run_optimize(parser.parse_args(["optimize", str(mlp), *argv]))

    assert cli("--from-version", "1", "--to-version", "2", "--int8", "--bench-seconds", "0.05") == 0
    out, err = capsys.readouterr()
    assert "mlp_pytorch: version 1 -> 2 (int8-dynamic, pytorch)" in out and "passed" in out
    assert "installing" in err and "7/7" in err  # the progress bar
    assert cli("--from-version", "1", "--to-version", "2", "--int8") == 2
    assert "refused (target_exists)" in capsys.readouterr().err
    forced = ("--from-version", "1", "--to-version", "2", "--int8", "--force", "--min-top1", "2")
    assert cli(*forced, "--bench-seconds", "0.05") == 1  # below the floor: version 2 kept as was
    assert (mlp / "2" / "optimize_report.json").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["optimize", str(mlp), "--from-version", "1", "--to-version", "2"])


class VersionWatch:
    """Wraps the filesystem calls that move or remove things and checks, after each
    one, what a server polling the repository would see: the version directory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, version_dir: Path) -> None:
        self.version_dir = version_dir
        self.calls: list[str] = []
        self.missing: list[str] = []
        for name in ("rename", "replace", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, self._watched(name, getattr(os, name)))
        monkeypatch.setattr(shutil, "rmtree", self._watched("rmtree", shutil.rmtree))
        with contextlib.suppress(ImportError):  # the directory swap, where there is one
            from convoy.optimize import install

            monkeypatch.setattr(install, "exchange", self._watched("exchange", install.exchange))

    def _watched(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            finally:
                self.calls.append(name)
                if not self.version_dir.is_dir():
                    self.missing.append(f"{name}{args[:2]}")

        return watched


@pytest.mark.parametrize("swap", ["exchange", "entry by entry"])
def test_force_replaces_a_version_without_it_ever_vanishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    model_dir = build_mlp(tmp_path, "pytorch")
    first = optimize(OptimizeRequest(model_dir, 1, 2, "int8", **FAST))  # type: ignore[arg-type]
    assert first.passed
    (model_dir / "2" / "stale.txt").write_text("from the version being replaced")
    (model_dir / "2" / "model.pt").write_bytes(b"the old version 2, not a model")
    if swap == "entry by entry":  # a filesystem that cannot exchange directories
        monkeypatch.setattr("convoy.optimize.install._renameat2", lambda: None)
    watch = VersionWatch(monkeypatch, model_dir / "2")
    request = OptimizeRequest(model_dir, 1, 2, "int8", force=True, **FAST)  # type: ignore[arg-type]
    report = optimize(request)
    monkeypatch.undo()
    assert report.passed
    assert watch.calls, "nothing was moved: the watch saw no step"
    # Which way it went: one atomic swap, or os.replace of each entry inside version 2.
    assert ("replace" in watch.calls) == (swap == "entry by entry"), watch.calls
    assert watch.missing == [], f"version 2 was missing after {watch.missing}"
    # The result: the new version whole, nothing of the old one, nothing left beside it.
    assert {p.name for p in (model_dir / "2").iterdir()} == {
        "model.pt",
        "optimize_report.json",
        "optimize_report.txt",
    }
    assert json.loads((model_dir / "2" / "optimize_report.json").read_text())["model"] == (
        "mlp_pytorch"
    )
    assert {p.name for p in model_dir.iterdir()} == {"1", "2", CONFIG_FILENAME}
    x = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(
        serve_once(model_dir, 2, {"INPUT": x}), serve_once(model_dir, 1, {"INPUT": x}), atol=0.05
    )
