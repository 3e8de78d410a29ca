"""ModelRepository.close at shutdown: every model at once, all within the time left."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from convoy.errors import ConvoyError
from convoy.metrics import Metrics
from convoy.repository.manager import ModelRepository

from .test_metrics import _SLOW_STEP  # 0.5 s a batch, Y = 3X

_IDENTITY = """
class Model:
    def __init__(self, config):
        pass
    def __call__(self, inputs):
        return {"Y": inputs["X"]}
"""


def _python_model(root: Path, name: str, source: str = _IDENTITY) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(source)
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "convoy_python"\nmax_batch_size: 8\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )


def test_a_load_still_running_does_not_hold_up_the_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("quick", "stuck"):
        _python_model(tmp_path, name)
    building = threading.Event()

    async def scenario() -> float:
        repo = ModelRepository(tmp_path, Metrics(gpus=list))
        build = repo._build

        def slow_build(model_dir: Path, keep: Any) -> Any:
            if model_dir.name == "stuck":
                building.wait(10)  # a model that takes long to load (an engine build)
            return build(model_dir, keep)

        repo._build = slow_build  # type: ignore[method-assign]
        await repo.load("quick")
        loading = asyncio.ensure_future(repo.load("stuck"))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="convoy.repository.manager"):
            await repo.close(timeout_s=0.3)
        took = time.monotonic() - start
        with pytest.raises(ConvoyError):
            repo.get("quick", "")
        building.set()
        await loading
        await repo.close()  # what the load built is released too
        return took

    took = asyncio.run(scenario())
    assert took < 3, took
    assert "['stuck'] were still loading" in caplog.text


_PIPE = """
name: "pipe"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    { model_name: "slow" model_version: -1
      input_map { key: "X" value: "IN" } output_map { key: "Y" value: "mid" } },
    { model_name: "quick" model_version: -1
      input_map { key: "X" value: "mid" } output_map { key: "Y" value: "OUT" } }
  ]
}
"""


def test_an_ensemble_request_in_flight_at_shutdown_finishes_its_steps(tmp_path: Path) -> None:
    """The ensembles drain before the models their steps run: unloading all at once
    closed the second step's model while the request was still in its first."""
    import numpy as np

    from convoy.batching.request import InferRequest

    _python_model(tmp_path, "quick", _IDENTITY)
    _python_model(tmp_path, "slow", _SLOW_STEP)
    (tmp_path / "pipe" / "1").mkdir(parents=True)
    (tmp_path / "pipe" / "config.pbtxt").write_text(_PIPE)

    async def scenario() -> Any:
        repo = ModelRepository(tmp_path, Metrics(gpus=list))
        for name in ("quick", "slow", "pipe"):
            await repo.load(name)
        request = InferRequest(
            id="1",
            inputs={"IN": np.ones((1, 4), dtype=np.float32)},
            outputs=("OUT",),
            rows=1,
            shape_key=(("IN", (4,)),),
            future=asyncio.get_running_loop().create_future(),
            arrival_ns=1,
        )
        running = asyncio.ensure_future(repo.get("pipe").infer(request))
        await asyncio.sleep(0.1)  # in its first step
        await repo.close(timeout_s=10)
        return await running

    result = asyncio.run(scenario())
    assert result.outputs["OUT"].tolist() == [[3.0] * 4]
