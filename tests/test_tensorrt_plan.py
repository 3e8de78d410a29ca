"""TensorRT build plans (no TensorRT needed) and the error where TensorRT is absent."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from convoy.backends.tensorrt_plan import Profile, engine_cache_key, optimization_profiles
from convoy.config import read_model_config, validate_model_config
from convoy.errors import ConfigError

from .conftest import ROOT

CONFIG = """
name: "bert"
backend: "tensorrt"
max_batch_size: 32
input [ { name: "ids" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "image" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] } ]
output [ { name: "out" data_type: TYPE_FP32 dims: [ 4 ] } ]
parameters { key: "trt_dynamic_max" value { string_value: "256" } }
"""


def spec_of(tmp_path: Path, text: str = CONFIG):  # type: ignore[no-untyped-def]
    model = tmp_path / "bert"
    model.mkdir(exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(model), str(model / "config.pbtxt"), "bert")


def test_profiles_follow_max_batch_size_and_dynamic_dims(tmp_path: Path) -> None:
    profiles = optimization_profiles(spec_of(tmp_path))
    assert profiles["ids"] == Profile(min=(1, 1), opt=(16, 128), max=(32, 256))
    assert profiles["image"] == Profile(min=(1, 3, 8, 8), opt=(16, 3, 8, 8), max=(32, 3, 8, 8))


def test_bad_dynamic_range_is_a_config_error(tmp_path: Path) -> None:
    text = CONFIG.replace('"256"', '"16"')  # max below the default opt of 128
    with pytest.raises(ConfigError, match="trt_dynamic"):
        optimization_profiles(spec_of(tmp_path, text))


def test_cache_key_changes_with_everything_the_engine_depends_on(tmp_path: Path) -> None:
    profiles = optimization_profiles(spec_of(tmp_path))
    base = engine_cache_key(b"onnx", "H200(9, 0)", "10.9", "fp16", profiles)
    assert base == engine_cache_key(b"onnx", "H200(9, 0)", "10.9", "fp16", profiles)
    others = {
        engine_cache_key(b"onnx2", "H200(9, 0)", "10.9", "fp16", profiles),
        engine_cache_key(b"onnx", "A100(8, 0)", "10.9", "fp16", profiles),
        engine_cache_key(b"onnx", "H200(9, 0)", "10.10", "fp16", profiles),
        engine_cache_key(b"onnx", "H200(9, 0)", "10.9", "int8", profiles),
        engine_cache_key(b"onnx", "H200(9, 0)", "10.9", "fp16", {"ids": profiles["image"]}),
    }
    assert base not in others and len(others) == 5


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_without_tensorrt_the_cli_and_loader_say_so(tmp_path: Path) -> None:
    spec_of(tmp_path)
    (tmp_path / "bert" / "1").mkdir()
    (tmp_path / "bert" / "1" / "model.onnx").write_bytes(b"not really")
    run = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "build-engine", str(tmp_path / "bert")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "TensorRT is not available" in run.stderr
    from convoy.backends import load_backend

    with pytest.raises(ConfigError, match="TensorRT is not available"):
        load_backend(spec_of(tmp_path), tmp_path / "bert/1/model.plan", "cuda:0", 1)


def _with(tmp_path: Path, **parameters: str):  # type: ignore[no-untyped-def]
    extra = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in parameters.items()
    )
    return spec_of(tmp_path, CONFIG + extra)


def test_precision_plan_on_tensorrt_10_uses_builder_flags(tmp_path: Path) -> None:
    from convoy.backends.tensorrt_plan import PrecisionPlan, precision_plan

    assert precision_plan(_with(tmp_path), 10, False, False) == PrecisionPlan(flags=("FP16",))
    fp32 = _with(tmp_path, trt_precision="fp32")
    assert precision_plan(fp32, 10, False, False) == PrecisionPlan()
    int8 = _with(tmp_path, trt_precision="int8", trt_calibration_dir="calib")
    assert precision_plan(int8, 10, False, True) == PrecisionPlan(("FP16", "INT8"), True)
    assert precision_plan(int8, 10, True, True).calibrate is False  # Q/DQ carry the scales
    with pytest.raises(ConfigError, match="trt_calibration_dir"):
        precision_plan(_with(tmp_path, trt_precision="int8"), 10, False, False)
    with pytest.raises(ConfigError, match="trt_precision"):
        precision_plan(_with(tmp_path, trt_precision="fp8"), 10, False, False)


def test_precision_plan_on_tensorrt_11_puts_the_precision_in_the_graph(tmp_path: Path) -> None:
    from convoy.backends.tensorrt_plan import PrecisionPlan, precision_plan

    # TensorRT 11 builds strongly typed networks: no FP16/INT8 flags, no calibrators.
    assert precision_plan(_with(tmp_path), 11, False, False) == PrecisionPlan(convert_to_fp16=True)
    int8 = _with(tmp_path, trt_precision="int8", trt_calibration_dir="calib")
    assert precision_plan(int8, 11, True, True) == PrecisionPlan()
    with pytest.raises(ConfigError, match="QuantizeLinear"):
        precision_plan(int8, 11, False, True)


def test_fp16_conversion_keeps_fp32_io_and_the_model(examples_dir: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from convoy.backends.tensorrt_plan import has_qdq, to_fp16

    original = (examples_dir / "image_classifier/1/model.onnx").read_bytes()
    half = to_fp16(original)
    assert not has_qdq(original) and not has_qdq(half)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    outputs = []
    for model in (original, half):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(float)"  # clients still send FP32
        outputs.append(session.run(["LOGITS"], {"INPUT": x})[0])
    assert outputs[1].dtype == np.float32
    scale = np.abs(outputs[0]).max()
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-2 * scale)
