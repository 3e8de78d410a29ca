"""ModelRepository.close at shutdown: every model at once, all within the time left."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from server.errors import ConvoyError
from server.metrics import Metrics
from server.repository.manager import ModelRepository

_IDENTITY = """
class Model:
    def __init__(self, config):
        pass
    def __call__(self, inputs):
        return {"Y": inputs["X"]}
"""


def _python_model(root: Path, name: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(_IDENTITY)
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
        with caplog.at_level(logging.WARNING, logger="server.repository.manager"):
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
