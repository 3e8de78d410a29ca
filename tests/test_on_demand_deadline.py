"""An on-demand load spends the request's deadline (issue 28): the wait is bounded by
the caller's deadline and the `timeout` parameter, and what the load left is all the
request has afterwards. In-process: a real repository, loader and path, no server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from convoy.batching.request import InferRequest, InferResult
from convoy.errors import DeadlineExceeded
from convoy.inference.caller import Caller, deadline_in
from convoy.inference.path import InferencePath
from convoy.metrics import Metrics
from convoy.pb import grpc_service_pb2 as pb
from convoy.repository.eviction import EvictionPolicy
from convoy.repository.manager import ModelRepository
from convoy.repository.ondemand import OnDemandLoader
from tests.linear import write_linear_model

# Its load waits for a file the test writes: a cold start as long as the test wants.
COLD = """
import os
import time


class Model:
    def __init__(self, config):
        while not os.path.exists({gate!r}):
            time.sleep(0.01)

    def __call__(self, inputs):
        return {{"Y": inputs["X"] * 3}}
"""


# Leaves a mark when it computes: a request answered late would have run it.
MARKS = """
from pathlib import Path


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        Path({mark!r}).touch()
        return {{"Y": inputs["X"] * 2}}
"""


def request(model: str, timeout_us: int | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    tensor = message.inputs.add(name="X", datatype="FP32")
    tensor.shape.extend([1, 1])
    message.raw_input_contents.append(np.ones((1, 1), np.float32).tobytes())
    if timeout_us is not None:
        message.parameters["timeout"].int64_param = timeout_us
    return message


class LoadedAtTheDeadline:
    """The loader, but each load ends only once the request's deadline has passed: a
    cold start that took the whole deadline (the model itself loads beforehand)."""

    def __init__(self, loader: OnDemandLoader) -> None:
        self._loader = loader

    @contextlib.asynccontextmanager
    async def held(self, name: str, deadline_ns: int | None) -> AsyncIterator[None]:
        async with self._loader.held(name, deadline_ns):
            assert deadline_ns is not None
            # Past it, not at it: the loop may wake a timer a clock tick early.
            await asyncio.sleep((deadline_ns - time.monotonic_ns()) / 1e9 + 0.05)
            yield


def served(root: Path) -> tuple[ModelRepository, OnDemandLoader, InferencePath]:
    repository = ModelRepository(root, Metrics())
    loader = OnDemandLoader(
        repository,
        EvictionPolicy(None, None),
        Metrics(),
        load_wait_s=3600.0,  # never what ends a wait here
        pinned=lambda name: False,
        settle=lambda: None,
    )
    path = InferencePath(repository)
    path.on_demand = loader
    return repository, loader, path


def test_a_load_that_takes_the_deadline_answers_deadline_exceeded(tmp_path: Path) -> None:
    mark = tmp_path / "computed"
    write_linear_model(tmp_path / "repo", "warm", {1: MARKS.format(mark=str(mark))})

    async def scenario() -> None:
        repository, loader, path = served(tmp_path / "repo")
        try:
            await repository.load("warm")
            path.on_demand = LoadedAtTheDeadline(loader)  # type: ignore[assignment]
            with pytest.raises(DeadlineExceeded, match="loaded after the request's deadline"):
                await path.infer(request("warm"), Caller("grpc", deadline_ns=deadline_in(0.2)))
            assert not mark.exists()
        finally:
            await loader.stop()
            await repository.close()

    asyncio.run(scenario())


def test_the_timeout_parameter_bounds_the_wait_for_a_load(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    write_linear_model(tmp_path / "repo", "cold", {1: COLD.format(gate=str(gate))})

    async def scenario() -> None:
        repository, loader, path = served(tmp_path / "repo")
        try:
            # No caller deadline, --load-wait-secs an hour: only `timeout` ends the wait
            # (the outer bound only stops a broken run from hanging).
            asked = path.infer(request("cold", timeout_us=100_000), Caller("grpc"))
            with pytest.raises(DeadlineExceeded, match="did not load in time"):
                await asyncio.wait_for(asked, 30)
        finally:
            gate.touch()  # the load goes on; it ends before the repository closes
            await loader.stop()
            await repository.close()

    asyncio.run(scenario())


def test_an_ensemble_step_waits_within_its_ensemble_requests_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        _, _, path = served(tmp_path)
        seen: list[Caller] = []

        async def run(name: str, version: str, build: object, caller: Caller) -> InferResult:
            seen.append(caller)
            return InferResult(outputs={})

        path.run = run  # type: ignore[method-assign]
        parent = InferRequest(
            id="1", inputs={}, outputs=(), rows=1, shape_key=(),
            future=asyncio.get_running_loop().create_future(), deadline_ns=12345,
        )  # fmt: skip
        await path.run_step("step", "", lambda model: parent, parent)
        assert seen[0].deadline_ns == 12345

    asyncio.run(scenario())


def test_the_time_remaining_is_read_from_the_deadline() -> None:
    assert Caller("grpc").time_remaining is None
    assert Caller("grpc", deadline_ns=time.monotonic_ns() - 1).time_remaining == 0.0
    left = Caller("grpc", deadline_ns=deadline_in(60.0)).time_remaining
    assert left is not None and 0.0 < left <= 60.0
