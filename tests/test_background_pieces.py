"""A background request while callers are about runs in pieces (ModelQueue.piece_rows),
on the real `tiny` model in-process: the joined answer is the whole request's, and the
model's statistics count it once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from convoy.app import ConvoyServer
from convoy.batching import queue as queue_module
from convoy.batching.request import InferRequest
from convoy.config import ServerConfig
from convoy.repository.examples import default_examples_dir, ensure_examples
from loadtests.launch import link_model


def request(values: np.ndarray, background: bool) -> InferRequest:
    rows = values.shape[0]
    return InferRequest(
        id="r", inputs={"INPUT0": values}, outputs=("OUTPUT0",), rows=rows,
        shape_key=(("INPUT0", (16,)),), future=asyncio.get_running_loop().create_future(),
        background=background,
    )  # fmt: skip


def test_a_background_request_in_pieces_answers_as_a_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "PIECE_NS", 1)  # pieces of one row, once measured
    link_model(ensure_examples(default_examples_dir()) / "tiny", tmp_path / "tiny")

    async def body() -> None:
        server = ConvoyServer(ServerConfig(model_repository=tmp_path), tmp_path)
        await server.repository.load_all()
        try:
            model = server.repository.get("tiny", "")
            rows = np.random.default_rng(0).random((5, 16), dtype=np.float32)
            whole = await model.infer(request(rows, background=True))  # measures a row
            await model.infer(request(rows[:1], background=False))  # a caller is about
            assert model.queue.piece_rows(request(rows, background=True)) == 1
            batches, served = model.stats.execution_count, model.stats.success.count
            pieced = await model.infer(request(rows, background=True))
            np.testing.assert_array_equal(pieced.outputs["OUTPUT0"], whole.outputs["OUTPUT0"])
            assert model.stats.execution_count - batches == 5  # one batch per piece
            assert model.stats.success.count - served == 1  # one request answered
        finally:
            await server.repository.close()

    asyncio.run(body())
