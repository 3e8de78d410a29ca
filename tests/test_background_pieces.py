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
            stats = model.stats
            batches, served, took = stats.execution_count, stats.success.count, stats.success.ns
            pieced = await model.infer(request(rows, background=True))  # arrival_ns 0
            np.testing.assert_array_equal(pieced.outputs["OUTPUT0"], whole.outputs["OUTPUT0"])
            assert stats.execution_count - batches == 5  # one batch per piece
            assert stats.success.count - served == 1  # one request answered
            assert 0 < stats.success.ns - took < 10e9  # timed from when it came, not from 0
        finally:
            await server.repository.close()

    asyncio.run(body())


def pieced_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConvoyServer:
    monkeypatch.setattr(queue_module, "PIECE_NS", 1)  # pieces of one row
    link_model(ensure_examples(default_examples_dir()) / "tiny", tmp_path / "tiny")
    return ConvoyServer(ServerConfig(model_repository=tmp_path), tmp_path)


async def started_in_pieces(server: ConvoyServer, rows: np.ndarray) -> asyncio.Task[object]:
    """A background request of many rows running in pieces beside a caller."""
    await server.repository.load_all()
    model = server.repository.get("tiny", "")
    await model.infer(request(rows[:1], background=False))  # a caller is about
    task = asyncio.ensure_future(model.infer(request(rows, background=True)))
    for _ in range(10_000):  # until a few pieces are done
        if model.stats.execution_count >= 4:
            break
        await asyncio.sleep(0.001)
    assert not task.done()
    return task


def test_a_drain_waits_for_the_last_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = pieced_model(tmp_path, monkeypatch)

    async def body() -> None:
        rows = np.random.default_rng(1).random((200, 16), dtype=np.float32)
        task = await started_in_pieces(server, rows)
        model = server.repository.get("tiny", "")
        await model.queue.close(drain=True, timeout_s=60)  # an unload, a reload, SIGTERM
        assert task.done() and task.exception() is None
        assert model.stats.success.count == 2 and model.stats.fail.count == 0
        await server.repository.close()

    asyncio.run(body())


def test_a_request_cancelled_between_pieces_is_counted_once_as_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = pieced_model(tmp_path, monkeypatch)

    async def body() -> None:
        rows = np.random.default_rng(2).random((200, 16), dtype=np.float32)
        task = await started_in_pieces(server, rows)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        model = server.repository.get("tiny", "")
        assert model.stats.fail.count == 1 and model.stats.failures == {"Cancelled": 1}
        await server.repository.close()

    asyncio.run(body())
