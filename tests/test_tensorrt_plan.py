"""TensorRT build plans (no TensorRT needed) and the error where TensorRT is absent."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from server.backends.tensorrt_plan import Profile, engine_cache_key, optimization_profiles
from server.config import read_model_config, validate_model_config
from server.errors import ConfigError

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
        [sys.executable, "-m", "server.cli", "build-engine", str(tmp_path / "bert")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "TensorRT is not available" in run.stderr
    from server.backends import load_backend

    with pytest.raises(ConfigError, match="TensorRT is not available"):
        load_backend(spec_of(tmp_path), tmp_path / "bert/1/model.plan", "cuda:0", 1)
