"""GPU paths of the backends; skipped, with the reason, where no CUDA GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.backends.pytorch import TorchScriptBackend
from server.config import read_model_config, validate_model_config
from server.scheduling.devices import cuda_device_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none on this machine)"),
]


def tiny_spec(examples_dir: Path, **parameters: str):  # type: ignore[no-untyped-def]
    config = read_model_config(examples_dir / "tiny")
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return validate_model_config(config, "tiny/config.pbtxt", "tiny")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("graphs", ["", "1,4,8"])
def test_torchscript_on_a_cuda_stream(examples_dir: Path, precision: str, graphs: str) -> None:
    params = {"precision": precision} | ({"cuda_graph_batch_sizes": graphs} if graphs else {})
    spec = tiny_spec(examples_dir, **params)
    backend = TorchScriptBackend(examples_dir / "tiny/1/model.pt", "cuda:0", spec)
    assert backend.device == "cuda:0"
    for rows in (1, 3, 8, 20):  # 3 pads to the 4 bucket; 20 runs without a graph
        x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
        out = backend.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
        assert out.shape == (rows, 16) and out.dtype == np.float32
        tolerance = 1e-6 if precision == "fp32" else 2e-2
        np.testing.assert_allclose(out, x * 2 + 1, rtol=tolerance, atol=tolerance)
    backend.close()


def test_onnxruntime_cuda_provider_where_installed(examples_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from server.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(examples_dir / "image_classifier/1/model.onnx", "cuda:0", 4)
    assert backend.device == "cuda:0"
    x = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    gpu = backend.run({"INPUT": x}, ["LOGITS"])["LOGITS"]
    cpu = OnnxRuntimeBackend(examples_dir / "image_classifier/1/model.onnx", "cpu", 4)
    np.testing.assert_allclose(
        gpu, cpu.run({"INPUT": x}, ["LOGITS"])["LOGITS"], rtol=1e-3, atol=1e-3
    )
