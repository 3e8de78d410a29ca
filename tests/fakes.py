"""Fakes for driving the batcher deterministically: a clock and a backend."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from convoy.batching.batch import Batch
from convoy.batching.queue import BatchDone, BatchOutcome
from convoy.batching.request import InferRequest
from convoy.errors import ConvoyError


@dataclass
class FakeClock:
    now: int = 1_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance_us(self, us: int) -> None:
        self.now += us * 1000


def make_request(
    rows: int = 1,
    *,
    arrival_ns: int = 0,
    shape: tuple[int, ...] = (4,),
    priority: int = 0,
    deadline_ns: int | None = None,
    value: float = 0.0,
    loop: asyncio.AbstractEventLoop | None = None,
) -> InferRequest:
    loop = loop or asyncio.get_event_loop_policy().get_event_loop()
    return InferRequest(
        id=str(value),
        inputs={"x": np.full((rows, *shape), value, dtype=np.float32)},
        outputs=("y",),
        rows=rows,
        shape_key=(("x", shape),),
        future=loop.create_future(),
        arrival_ns=arrival_ns,
        deadline_ns=deadline_ns,
        priority=priority,
    )


@dataclass
class FakeRunner:
    """Runs batches as y = x + 1; can be held to observe concurrency."""

    capacity: int = 1
    batches: list[tuple[float, ...]] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    gate: asyncio.Event | None = None
    fail_with: ConvoyError | Exception | None = None

    def submit(self, batch: Batch, done: BatchDone) -> None:
        answer_when_done(asyncio.ensure_future(self._run(batch)), done)

    async def _run(self, batch: Batch) -> BatchOutcome:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            inputs = batch.gather_inputs()
            self.batches.append(tuple(float(r.inputs["x"].flat[0]) for r in batch.requests))
            if self.fail_with is not None:
                raise self.fail_with
            return BatchOutcome({"y": inputs["x"] + 1}, input_ns=1, infer_ns=2, device="cpu")
        finally:
            self.running -= 1


def answer_when_done(run: asyncio.Future[BatchOutcome], done: BatchDone) -> None:
    """A runner's coroutine, answered through the queue's callback as the pool does."""

    def finished(f: asyncio.Future[BatchOutcome]) -> None:
        done(f.exception() or f.result())

    run.add_done_callback(finished)


@dataclass
class RecordingObserver:
    done: list[tuple[str, str | None]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)

    def on_batch(self, batch: Batch, outcome: BatchOutcome, output_ns: int) -> None:
        self.batches.append(batch.rows)

    def on_request_done(self, request: InferRequest, error: ConvoyError | None, now: int) -> None:
        self.done.append((request.id, type(error).__name__ if error else None))
