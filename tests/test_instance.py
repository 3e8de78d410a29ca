"""A model instance's own work, without threads: gathering a batch (into a GPU
backend's staging buffers where it offers them) and ranking outputs for the
classification extension once per batch, on the device where the backend can."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convoy.backends.base import RanksOnDevice, StagesInputs
from convoy.backends.staging import StagingBuffers
from convoy.batching.batch import Batch
from convoy.batching.request import InferRequest
from convoy.kernels.classify import topk_reference
from convoy.scheduling.pool import ModelInstance
from convoy.tensors import Ranked, Ranking


def request(
    loop: asyncio.AbstractEventLoop, scores: np.ndarray, classification: dict[str, int]
) -> InferRequest:
    return InferRequest(
        id="",
        inputs={"x": scores},
        outputs=("y",),
        rows=scores.shape[0],
        shape_key=(("x", scores.shape[1:]),),
        future=loop.create_future(),
        classification=classification,
    )


class Identity:
    """y = x, on the CPU: classification is ranked by the instance, on the host."""

    device = "cpu"

    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []

    def run(self, inputs: Mapping[str, Any], output_names: Sequence[str]) -> dict[str, Any]:
        self.asked.append(tuple(output_names))
        return {"y": inputs["x"].copy()}

    def close(self) -> None:
        pass


class DeviceIdentity(Identity):
    """Pretends to be a GPU backend: stages inputs and ranks "on the device"."""

    device = "cuda:0"

    def __init__(self) -> None:
        super().__init__()
        self.staging = StagingBuffers(pinned=False)
        self.rankings: list[dict[str, Ranking]] = []

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        return self.staging.view(name, shape, dtype)

    def run_ranked(
        self,
        inputs: Mapping[str, Any],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Any], dict[str, Ranked]]:
        assert self.staging.holds(inputs["x"])  # gathered straight into the staging buffer
        self.rankings.append(dict(rankings))
        outputs = self.run(inputs, output_names)
        values, indices = topk_reference(inputs["x"], rankings["y"].k, rankings["y"].softmax)
        return {n: outputs[n] for n in output_names}, {"y": Ranked(values, indices)}


def execute(backend: Any, batch: Batch, softmax: frozenset[str] = frozenset()) -> Any:
    """One batch through ModelInstance.execute, called here rather than on its thread."""
    instance = ModelInstance("m", backend, softmax)
    try:
        return instance.execute(batch)
    finally:
        instance.close()


def test_host_ranking_once_per_batch_with_the_largest_k() -> None:
    loop = asyncio.new_event_loop()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 10)).astype(np.float32), rng.standard_normal((1, 10))
    batch = Batch(
        (request(loop, a, {"y": 2}), request(loop, b.astype(np.float32), {})), batched=True
    )
    assert batch.classification == {"y": 2} and batch.output_names == ("y",)
    backend = Identity()
    outcome = execute(backend, batch, frozenset({"y"}))
    assert backend.asked == [("y",)]
    first, second = batch.split_outputs(outcome.outputs, outcome.ranked)
    assert first.outputs == {} and set(first.ranked) == {"y"}
    values, indices = topk_reference(a, 2, softmax=True)
    np.testing.assert_array_equal(first.ranked["y"].indices, indices)
    np.testing.assert_allclose(first.ranked["y"].values, values, rtol=1e-6)
    assert second.ranked == {} and second.outputs["y"].shape == (1, 10)
    loop.close()


def test_classification_only_batch_asks_the_runtime_for_the_ranked_output() -> None:
    loop = asyncio.new_event_loop()
    scores = np.arange(12, dtype=np.float32).reshape(3, 4)
    batch = Batch((request(loop, scores[:1], {"y": 1}), request(loop, scores[1:], {"y": 3})), True)
    assert batch.output_names == () and batch.classification == {"y": 3}
    backend = Identity()
    outcome = execute(backend, batch)
    assert backend.asked == [("y",)] and outcome.outputs == {}
    first, second = batch.split_outputs(outcome.outputs, outcome.ranked)
    assert first.ranked["y"].indices.tolist() == [[3, 2, 1]]
    assert second.ranked["y"].values.tolist() == [[7, 6, 5], [11, 10, 9]]
    loop.close()


def test_gpu_backend_gathers_into_staging_and_ranks_on_device() -> None:
    loop = asyncio.new_event_loop()
    backend = DeviceIdentity()
    assert isinstance(backend, StagesInputs) and isinstance(backend, RanksOnDevice)
    assert not isinstance(Identity(), RanksOnDevice)
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 6)).astype(np.float32) for n in (1, 3)]
    batch = Batch((request(loop, parts[0], {"y": 2}), request(loop, parts[1], {"y": 1})), True)
    outcome = execute(backend, batch, frozenset({"y"}))
    assert backend.rankings == [{"y": Ranking(k=2, softmax=True, per_row=True)}]
    assert backend.asked == [()]  # nothing wanted in full: only the ranking comes back
    _, second = batch.split_outputs(outcome.outputs, outcome.ranked)
    np.testing.assert_array_equal(second.ranked["y"].indices, topk_reference(parts[1], 2)[1])
    single = Batch((request(loop, parts[1], {}),), True)  # one request is staged too
    out = execute(backend, single).outputs["y"]
    np.testing.assert_array_equal(out, parts[1])
    loop.close()


def test_staging_buffers_grow_and_are_reused() -> None:
    staging = StagingBuffers(pinned=False)
    small = staging.view("x", (2, 3), np.dtype(np.float32))
    small[:] = 1
    again = staging.view("x", (1, 3), np.dtype(np.float32))
    assert np.shares_memory(small, again) and staging.holds(again)
    big = staging.view("x", (4096, 3), np.dtype(np.float32))
    assert big.shape == (4096, 3) and not np.shares_memory(big, small)
    assert not staging.holds(np.zeros(3, np.float32))
    staged = staging.view("x", (2, 3), np.dtype(np.float32))
    staged[:] = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(staging.upload(staged, "cpu").numpy(), staged)


def test_a_model_without_batch_dimension_ranks_its_whole_output() -> None:
    from convoy.config import ModelSpec, TensorSpec
    from convoy.config import VersionPolicy as Policy
    from convoy.inference.codec import encode_response
    from convoy.pb import grpc_service_pb2 as pb

    loop = asyncio.new_event_loop()
    scores = np.array([[0.1, 0.9], [0.5, 0.2]], np.float32)  # one item, ranked as a whole
    asked = request(loop, scores, {"y": 3})
    batch = Batch((asked,), batched=False)
    outcome = execute(Identity(), batch)
    (result,) = batch.split_outputs(outcome.outputs, outcome.ranked)
    assert result.ranked["y"].indices.tolist() == [[1, 2, 3]]
    spec = ModelSpec(
        name="m", backend="onnxruntime", platform="onnxruntime_onnx", max_batch_size=0,
        inputs=(TensorSpec("x", "FP32", (2, 2)),), outputs=(TensorSpec("y", "FP32", (2, 2)),),
        batching=None, instance_groups=(), version_policy=Policy(),
        default_model_filename="model.onnx",
    )  # fmt: skip
    reply = encode_response(pb.ModelInferRequest(), spec, 1, asked, result)
    assert list(reply.outputs[0].shape) == [3] and reply.outputs[0].datatype == "BYTES"
    loop.close()


def test_classification_strings_are_formatted_on_the_instance() -> None:
    """Issue 10 item 10: the "value:index:label" strings are made once per batch on the
    instance's thread; the event loop only slices them per request."""
    loop = asyncio.new_event_loop()
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], np.float32)
    batch = Batch((request(loop, scores, {"y": 2}),), batched=True)
    instance = ModelInstance("m", Identity(), labels={"y": ["cat", "dog", "eel"]})
    try:
        outcome = instance.execute(batch)
    finally:
        instance.close()
    text = outcome.ranked["y"].text
    assert text is not None
    assert text.tolist() == [
        [b"0.900000:1:dog", b"0.500000:2:eel"],
        [b"0.700000:0:cat", b"0.300000:2:eel"],
    ]
    (result,) = batch.split_outputs(outcome.outputs, outcome.ranked)
    assert result.ranked["y"].text is not None and result.ranked["y"].text.shape == (2, 2)
