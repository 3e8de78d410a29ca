"""GPU paths of the backends; skipped, with the reason, where no CUDA GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convoy.backends.pytorch import TorchScriptBackend
from convoy.config import read_model_config, validate_model_config
from convoy.scheduling.devices import cuda_device_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none on this machine)"),
]


def tiny_spec(small_examples: Path, **parameters: str):  # type: ignore[no-untyped-def]
    config = read_model_config(small_examples / "tiny")
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return validate_model_config(config, "tiny/config.pbtxt", "tiny")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("graphs", ["", "1,4,8"])
def test_torchscript_on_a_cuda_stream(small_examples: Path, precision: str, graphs: str) -> None:
    params = {"precision": precision} | ({"cuda_graph_batch_sizes": graphs} if graphs else {})
    spec = tiny_spec(small_examples, **params)
    backend = TorchScriptBackend(small_examples / "tiny/1/model.pt", "cuda:0", spec)
    assert backend.device == "cuda:0"
    for rows in (1, 3, 8, 20):  # 3 pads to the 4 bucket; 20 runs without a graph
        x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
        out = backend.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
        assert out.shape == (rows, 16) and out.dtype == np.float32
        tolerance = 1e-6 if precision == "fp32" else 2e-2
        np.testing.assert_allclose(out, x * 2 + 1, rtol=tolerance, atol=tolerance)
    backend.close()


def test_onnxruntime_cuda_provider_where_installed(small_examples: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from convoy.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(small_examples / "image_classifier/1/model.onnx", "cuda:0", 4)
    assert backend.device == "cuda:0"
    x = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    gpu = backend.run({"INPUT": x}, ["LOGITS"])["LOGITS"]
    cpu = OnnxRuntimeBackend(small_examples / "image_classifier/1/model.onnx", "cpu", 4)
    np.testing.assert_allclose(
        gpu, cpu.run({"INPUT": x}, ["LOGITS"])["LOGITS"], rtol=1e-3, atol=1e-3
    )


def test_batches_are_gathered_in_pinned_staging_buffers(small_examples: Path) -> None:
    import asyncio

    from convoy.batching.batch import Batch
    from convoy.batching.request import InferRequest
    from convoy.scheduling.pool import ModelInstance

    spec = tiny_spec(small_examples, precision="fp16")
    backend = TorchScriptBackend(small_examples / "tiny/1/model.pt", "cuda:0", spec)
    instance = ModelInstance("tiny-gpu", backend, frozenset({"OUTPUT0"}))
    loop = asyncio.new_event_loop()
    rng = np.random.default_rng(9)
    parts = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 5, 2)]
    requests = tuple(
        InferRequest(
            id=str(i),
            inputs={"INPUT0": x},
            outputs=("OUTPUT0",),
            rows=len(x),
            shape_key=((16,),),
            future=loop.create_future(),
            classification={"OUTPUT0": 3} if i == 1 else {},
        )
        for i, x in enumerate(parts)
    )
    staged = backend.input_buffer("INPUT0", (8, 16), np.dtype(np.float32))
    assert staged is not None
    import torch

    assert torch.from_numpy(staged).is_pinned()
    batch = Batch(requests, batched=True)
    outcome = instance.execute(batch)
    results = batch.split_outputs(outcome.outputs, outcome.ranked)
    for x, result in zip(parts, results, strict=True):
        if "OUTPUT0" in result.outputs:
            np.testing.assert_allclose(result.outputs["OUTPUT0"], x * 2 + 1, rtol=2e-2, atol=2e-2)
    expected = np.argsort(-(parts[1] * 2 + 1), axis=1)[:, :3]
    assert results[1].ranked["OUTPUT0"].indices.shape == (5, 3)
    assert (results[1].ranked["OUTPUT0"].indices[:, 0] == expected[:, 0]).all()
    instance.close()
    loop.close()


def test_cuda_graphs_are_captured_at_load(small_examples: Path) -> None:
    from convoy.backends import load_backend

    spec = tiny_spec(small_examples, cuda_graph_batch_sizes="1,4,16")
    backend = load_backend(spec, small_examples / "tiny/1/model.pt", "cuda:0", 1)
    assert sorted(backend._graphs) == [1, 4, 16]  # type: ignore[attr-defined]
    x = np.ones((3, 16), np.float32)
    np.testing.assert_allclose(backend.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x * 2 + 1)
    backend.close()
