"""ONNX Runtime execution providers from Triton's optimization.execution_accelerators."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from convoy.backends.onnxruntime import OnnxRuntimeBackend, execution_providers
from convoy.config import Accelerator, Optimization, read_model_config, validate_model_config
from convoy.errors import ConfigError

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def optimization(gpu: tuple[Accelerator, ...] = (), cpu: tuple[Accelerator, ...] = ()):  # type: ignore[no-untyped-def]
    return Optimization(gpu_accelerators=gpu, cpu_accelerators=cpu)


def test_tensorrt_accelerator_in_triton_spelling() -> None:
    trt = Accelerator(
        "tensorrt",
        {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824",
         "trt_engine_cache_enable": "1"},
    )  # fmt: skip
    cuda = Accelerator("cuda", {"cudnn_conv_use_max_workspace": "0"})
    providers = execution_providers("m", optimization((trt, cuda)), "cuda:1", ALL)
    assert providers == [
        (
            "TensorrtExecutionProvider",
            {"device_id": "1", "trt_fp16_enable": "True", "trt_int8_enable": "False",
             "trt_max_workspace_size": "1073741824", "trt_engine_cache_enable": "1"},
        ),
        ("CUDAExecutionProvider", {"device_id": "1", "cudnn_conv_use_max_workspace": "0"}),
        "CPUExecutionProvider",
    ]  # fmt: skip


def test_missing_providers_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    trt = (Accelerator("tensorrt"),)
    with caplog.at_level(logging.WARNING):
        providers = execution_providers("m", optimization(trt), "cuda:0", ALL[1:])
    assert providers == [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text
    # A CPU instance (no GPU, or KIND_CPU) never gets GPU providers.
    assert execution_providers("m", optimization(trt), "cpu", ALL) == ["CPUExecutionProvider"]
    openvino = (Accelerator("openvino"),)
    assert execution_providers(
        "m", optimization(cpu=openvino), "cpu", ["CPUExecutionProvider"]
    ) == ["CPUExecutionProvider"]
    assert execution_providers(
        "m",
        optimization(cpu=openvino),
        "cpu",
        ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
    ) == [("OpenVINOExecutionProvider", {}), "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("gpu", "cpu", "field"),
    [
        ((Accelerator("tensorflow"),), (), "gpu_execution_accelerator[0].name"),
        ((), (Accelerator("cuda"),), "cpu_execution_accelerator[0].name"),
    ],
)
def test_unknown_accelerators_name_the_field(
    gpu: tuple[Accelerator, ...], cpu: tuple[Accelerator, ...], field: str
) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        execution_providers("m", optimization(gpu, cpu), "cpu", ALL)


def test_config_optimization_reaches_the_session(tmp_path: Path, examples_dir: Path) -> None:
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "1/model.onnx").symlink_to(examples_dir / "image_classifier/1/model.onnx")
    (model / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]\n'
        'output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] } ]\n'
        "optimization { graph { level: 2 } execution_accelerators {\n"
        '  gpu_execution_accelerator [ { name: "tensorrt" } ] } }\n'
    )
    spec = validate_model_config(read_model_config(model), str(model), "m")
    assert spec.optimization.graph_level == 2
    assert [a.name for a in spec.optimization.gpu_accelerators] == ["tensorrt"]
    backend = OnnxRuntimeBackend(model / "1/model.onnx", "cpu", 1, spec)
    assert backend.device == "cpu"
    x = np.zeros((2, 3, 64, 64), np.float32)
    assert backend.run({"INPUT": x}, ["LOGITS"])["LOGITS"].shape == (2, 1000)
    text = (model / "config.pbtxt").read_text().replace("level: 2", "level: 7")
    (model / "config.pbtxt").write_text(text)
    with pytest.raises(ConfigError, match=r"optimization\.graph\.level"):
        validate_model_config(read_model_config(model), str(model), "m")
