"""ModelQueue with a fake clock and a fake runner: answers, ordering, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from convoy.batching.batch import Batch
from convoy.batching.queue import BatchOutcome, ModelQueue
from convoy.batching.request import InferRequest
from convoy.config import BatchingConfig, QueuePolicy
from convoy.errors import DeadlineExceeded, InternalError, Overloaded, Unavailable

from .fakes import FakeClock, FakeRunner, RecordingObserver, answer_when_done, make_request


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def make_queue(
    runner: FakeRunner, batching: BatchingConfig | None, clock: FakeClock, max_batch: int = 8
) -> tuple[ModelQueue, RecordingObserver]:
    observer = RecordingObserver()
    queue = ModelQueue("m", max_batch, batching, runner, observer, clock)
    queue.start()
    return queue, observer


def test_every_request_gets_its_own_rows_back() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, observer = make_queue(runner, BatchingConfig(), clock)
        first = make_request(value=0)
        queue.submit(first)
        await settle()  # the first batch is running (held by the gate)
        rest = [make_request(rows=2, value=i) for i in range(1, 4)]
        for r in rest:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        results = await asyncio.gather(*(r.future for r in [first, *rest]))
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.outputs["y"], np.full((max(1, i and 2), 4), i + 1))
        assert runner.batches == [(0.0,), (1.0, 2.0, 3.0)]  # the queued three ran together
        assert observer.batches == [1, 6]
        await queue.close(drain=True)

    run(body)


def test_concurrency_is_bounded_by_instance_count() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(capacity=2, gate=asyncio.Event())
        queue, _ = make_queue(runner, None, clock)  # no dynamic batching: one request a batch
        requests = [make_request(value=i) for i in range(6)]
        for r in requests:
            queue.submit(r)
        await settle()
        assert runner.running == 2
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*(r.future for r in requests))
        assert runner.max_running == 2
        assert len(runner.batches) == 6
        await queue.close(drain=True)

    run(body)


def test_full_queue_refuses_at_once() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        batching = BatchingConfig(default_queue_policy=QueuePolicy(max_queue_size=2))
        queue, _ = make_queue(runner, batching, clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()  # running, not queued
        queue.submit(make_request(value=1))
        queue.submit(make_request(value=2))
        with pytest.raises(Overloaded, match="full"):
            queue.submit(make_request(value=3))
        runner.gate.set()  # type: ignore[union-attr]
        await queue.close(drain=True)

    run(body)


def test_expired_request_is_answered_without_running() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()
        late = make_request(value=1, deadline_ns=clock.now + 1000)
        queue.submit(late)
        clock.advance_us(5)
        runner.gate.set()  # type: ignore[union-attr]
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert (1.0,) not in runner.batches
        await queue.close(drain=True)

    run(body)


def test_priorities_run_first() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        batching = BatchingConfig(priority_levels=2, default_priority_level=2)
        queue, _ = make_queue(runner, batching, clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()
        low = make_request(value=1)
        high = make_request(value=2, priority=1)
        queue.submit(low)
        queue.submit(high)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(low.future, high.future)
        assert runner.batches == [(0.0,), (2.0,), (1.0,)]
        await queue.close(drain=True)

    run(body)


def test_cancelled_request_is_dropped() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()
        gone = make_request(value=1)
        kept = make_request(value=2)
        queue.submit(gone)
        queue.submit(kept)
        gone.future.cancel()
        runner.gate.set()  # type: ignore[union-attr]
        await kept.future
        assert (1.0,) not in runner.batches
        await queue.close(drain=True)

    run(body)


def test_backend_failure_answers_every_request_once() -> None:
    async def body() -> None:
        clock = FakeClock()
        runner = FakeRunner(fail_with=RuntimeError("boom"))
        queue, observer = make_queue(runner, BatchingConfig(), clock)
        requests = [make_request(value=i) for i in range(3)]
        for r in requests:
            queue.submit(r)
        for r in requests:
            with pytest.raises(InternalError, match="boom"):
                await r.future
        assert sorted(observer.done) == sorted((r.id, "InternalError") for r in requests)
        await queue.close(drain=True)

    run(body)


def test_close_without_drain_answers_the_queued() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        running = make_request(value=0)
        queue.submit(running)
        await settle()
        waiting = make_request(value=1)
        queue.submit(waiting)
        closing = asyncio.ensure_future(queue.close(drain=False))
        await settle()
        with pytest.raises(Unavailable):
            await waiting.future
        runner.gate.set()  # type: ignore[union-attr]
        await closing
        assert (await running.future).outputs["y"][0, 0] == 1
        with pytest.raises(Unavailable):
            queue.submit(make_request(value=3))

    run(body)


class GatedPair(FakeRunner):
    """Two instances; batch i is held by gates[i % 2] until the test opens it."""

    def __init__(self) -> None:
        super().__init__(capacity=2)
        self.gates = [asyncio.Event(), asyncio.Event()]

    def submit(self, batch, done):  # type: ignore[no-untyped-def]
        gate = self.gates[len(self.batches) % 2]
        self.batches.append(tuple(float(r.inputs["x"].flat[0]) for r in batch.requests))

        async def run() -> BatchOutcome:
            await gate.wait()
            x = batch.gather_inputs()["x"]
            return BatchOutcome({"y": x + 1}, input_ns=1, infer_ns=1, device="cpu")

        answer_when_done(asyncio.ensure_future(run()), done)


def test_preserve_ordering_releases_answers_in_dispatch_order() -> None:
    async def body() -> None:
        clock = FakeClock()
        order: list[str] = []
        runner = GatedPair()
        queue, _ = make_queue(runner, BatchingConfig(preserve_ordering=True), clock, max_batch=1)
        first, second = make_request(value=0), make_request(value=1)
        for r in (first, second):
            r.future.add_done_callback(lambda f, r=r: order.append(r.id))
        queue.submit(first)
        await settle()
        queue.submit(second)
        await settle()
        runner.gates[1].set()  # the second batch finishes first...
        await settle()
        assert order == []  # ...but its answer waits for the first
        runner.gates[0].set()
        await asyncio.gather(first.future, second.future)
        assert order == ["0", "1"]
        await queue.close(drain=True)

    run(body)


def test_close_releases_answers_held_behind_a_batch_stuck_past_the_grace_period() -> None:
    """preserve_ordering holds a finished batch for an earlier one; when close() gives
    up on the earlier one, the held answer must still reach its caller."""

    async def body() -> None:
        runner = GatedPair()
        queue, observer = make_queue(
            runner, BatchingConfig(preserve_ordering=True), FakeClock(), max_batch=1
        )
        stuck, held = make_request(value=0), make_request(value=1)
        queue.submit(stuck)
        await settle()
        queue.submit(held)
        await settle()
        runner.gates[1].set()
        await settle()
        await queue.close(drain=False, timeout_s=0.05)
        with pytest.raises(Unavailable, match="while this batch was running"):
            await asyncio.wait_for(stuck.future, 2)
        answer = await asyncio.wait_for(held.future, 2)
        np.testing.assert_array_equal(answer.outputs["y"], np.full((1, 4), 2.0))
        runner.gates[0].set()  # the stuck batch returns late: nobody is answered twice
        await settle()
        assert sorted(observer.done) == [("0", "Unavailable"), ("1", None)]

    run(body)


def test_a_failing_statistics_observer_costs_no_caller_its_answer() -> None:
    class Broken(RecordingObserver):
        def on_batch(self, batch, outcome, output_ns):  # type: ignore[no-untyped-def]
            raise RuntimeError("a bug in the statistics")

        def on_request_done(self, request, error, now):  # type: ignore[no-untyped-def]
            raise RuntimeError("a bug in the statistics")

    async def body() -> None:
        runner = FakeRunner(gate=asyncio.Event())
        queue = ModelQueue("m", 8, BatchingConfig(), runner, Broken(), FakeClock())
        queue.start()
        requests = [make_request(value=i) for i in range(4)]
        for r in requests:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        results = await asyncio.wait_for(asyncio.gather(*(r.future for r in requests)), 2)
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), i + 1))
        after = make_request(value=9)  # and the queue still dispatches
        queue.submit(after)
        answer = await asyncio.wait_for(after.future, 2)
        np.testing.assert_array_equal(answer.outputs["y"], np.full((1, 4), 10))
        await queue.close(drain=True)

    run(body)


def test_delay_action_runs_late_requests_after_the_rest() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        policy = QueuePolicy(timeout_action="DELAY", default_timeout_us=10)
        queue, _ = make_queue(runner, BatchingConfig(default_queue_policy=policy), clock, 1)
        queue.submit(make_request(value=0))
        await settle()
        late = make_request(value=1)
        queue.submit(late)
        clock.advance_us(50)  # `late` is past its timeout...
        fresh = make_request(value=2)
        queue.submit(fresh)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(late.future, fresh.future)  # ...but is run, not rejected
        assert runner.batches == [(0.0,), (2.0,), (1.0,)]
        await queue.close(drain=True)

    run(body)


def test_timeout_override_only_where_allowed() -> None:
    async def body() -> None:
        clock = FakeClock()
        strict = QueuePolicy(default_timeout_us=100)
        loose = QueuePolicy(default_timeout_us=100, allow_timeout_override=True)
        for policy, expected in ((strict, 100_000), (loose, 5_000_000)):
            queue, _ = make_queue(
                FakeRunner(gate=asyncio.Event()), BatchingConfig(default_queue_policy=policy), clock
            )
            request = make_request(deadline_ns=clock.now + 5_000_000)
            queue.submit(request)
            assert request.deadline_ns == clock.now + expected
            await queue.close(drain=False)

    run(body)


def test_preferred_batch_size_through_the_queue() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        batching = BatchingConfig(preferred_batch_sizes=(2, 4), max_queue_delay_us=10**6)
        queue, _ = make_queue(runner, batching, clock, max_batch=8)
        requests = [make_request(value=i) for i in range(5)]
        for r in requests:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*(r.future for r in requests[:4]))
        assert runner.batches[0] == (0.0, 1.0, 2.0, 3.0)  # cut at the preferred 4
        assert queue.depth == 1  # the fifth waits for company or the delay
        await queue.close(drain=False)
        with pytest.raises(Unavailable):
            await requests[4].future

    run(body)


def test_slo_limits_shape_batches() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        observer = RecordingObserver()
        queue = ModelQueue("m", 8, BatchingConfig(), runner, observer, clock, slo_target_ns=10**6)
        queue.start()
        assert queue.slo is not None
        queue.slo.batch_limit = 2
        queue._apply_slo()
        requests = [make_request(value=i) for i in range(4)]
        for r in requests:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*(r.future for r in requests))
        assert all(len(b) <= 2 for b in runner.batches)
        await queue.close(drain=True)

    run(body)


def test_deadline_in_a_busy_queue_is_answered_on_time() -> None:
    """Issue 10 item 8: the instance stays busy, no batch forms, yet the expired
    request is answered at its deadline rather than when a batch would have formed."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, observer = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()  # the instance is busy, held by the gate
        late = make_request(value=1, deadline_ns=clock.now + 1_000)
        queue.submit(late)
        clock.advance_us(5)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(late.future, 2)
        assert ("1", "DeadlineExceeded") in observer.done
        assert queue.depth == 0
        runner.gate.set()  # type: ignore[union-attr]
        await queue.close(drain=True)

    run(body)


def test_cancelled_requests_do_not_hold_queue_places() -> None:
    """Issue 10 item 8: a full queue of callers that left is no reason to refuse."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        batching = BatchingConfig(default_queue_policy=QueuePolicy(max_queue_size=2))
        queue, observer = make_queue(runner, batching, clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()
        gone = [make_request(value=v) for v in (1, 2)]
        for r in gone:
            queue.submit(r)
        for r in gone:
            r.future.cancel()
        kept = make_request(value=3)
        queue.submit(kept)  # accepted: the two cancelled ones gave their places up
        runner.gate.set()  # type: ignore[union-attr]
        assert (await kept.future).outputs["y"][0, 0] == 4
        assert sorted(e for i, e in observer.done if i in ("1", "2")) == [
            "Cancelled",
            "Cancelled",
        ]
        await queue.close(drain=True)

    run(body)


def test_cancelled_while_running_is_counted_as_cancelled() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, observer = make_queue(runner, BatchingConfig(), clock)
        request = make_request(value=7)
        queue.submit(request)
        await settle()  # its batch is running
        request.future.cancel()
        runner.gate.set()  # type: ignore[union-attr]
        await queue.close(drain=True)
        assert observer.done == [("7", "Cancelled")]

    run(body)


def test_drain_is_bounded_and_answers_what_is_stuck() -> None:
    """Issue 10 item 6: a batch that never finishes must not hang unload or SIGTERM."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, observer = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        stuck, waiting = make_request(value=0), make_request(value=1)
        queue.submit(stuck)
        await settle()
        queue.submit(waiting)
        await asyncio.wait_for(queue.close(drain=True, timeout_s=0.05), 5)
        for r in (stuck, waiting):
            with pytest.raises(Unavailable):
                await r.future
        runner.gate.set()  # type: ignore[union-attr]
        await settle()  # the stuck batch ends late: nobody is answered or counted twice
        assert sorted(observer.done) == [("0", "Unavailable"), ("1", "Unavailable")]

    run(body)


def test_stop_accepting_answers_the_queued_and_refuses_at_once() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()
        waiting = make_request(value=1)
        queue.submit(waiting)
        queue.stop_accepting(Unavailable("no instance of model 'm' is left"))
        with pytest.raises(Unavailable, match="no instance"):
            await waiting.future
        with pytest.raises(Unavailable, match="no instance"):
            queue.submit(make_request(value=2))
        runner.gate.set()  # type: ignore[union-attr]
        await queue.close(drain=True)

    run(body)


def test_background_work_runs_after_every_caller() -> None:
    """A rollout's comparison run waits behind callers even without priority levels."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()
        mirror = make_request(value=1)
        mirror.background = True
        queue.submit(mirror)
        callers = [make_request(value=v) for v in (2, 3)]
        for r in callers:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(mirror.future, *(r.future for r in callers))
        assert runner.batches == [(0.0,), (2.0,), (3.0,), (1.0,)]
        await queue.close(drain=True)

    run(body)


def background(value: float, rows: int = 1) -> InferRequest:
    request = make_request(rows=rows, value=value)
    request.background = True
    return request


def test_a_callers_batch_never_holds_background_rows() -> None:
    """Background rows would make a caller's batch bigger and slower: they run apart."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock)
        queue.submit(make_request(value=0))
        await settle()  # the instance is busy
        queued = [
            background(1, rows=2),
            make_request(value=2),
            background(3),
            make_request(value=4),
        ]
        for r in queued:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*(r.future for r in queued))
        # While callers are about, a background batch is one request: a caller arriving
        # behind it waits for that request's rows only.
        assert runner.batches == [(0.0,), (2.0, 4.0), (1.0,), (3.0,)]
        await queue.close(drain=True)

    run(body)


@dataclass
class CountingRunner(FakeRunner):
    """Also counts the batches of background work running at once."""

    background_running: int = 0
    background_most: int = 0

    async def _run(self, batch: Batch) -> BatchOutcome:
        mine = all(r.background for r in batch.requests)
        self.background_running += mine
        self.background_most = max(self.background_most, self.background_running)
        try:
            return await super()._run(batch)
        finally:
            self.background_running -= mine


def test_background_leaves_an_instance_free_while_callers_are_about() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), CountingRunner(capacity=2, gate=asyncio.Event())
        queue, _ = make_queue(runner, None, clock)
        first = make_request(value=0)
        queue.submit(first)
        await settle()
        jobs = [background(v) for v in (1, 2, 3)]
        for r in jobs:
            queue.submit(r)
        await settle()
        assert runner.running == 1  # no background batch beside the caller's
        late = make_request(value=4)
        queue.submit(late)
        await settle()
        assert runner.running == 2  # the late caller found the instance left free
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(first.future, late.future, *(r.future for r in jobs))
        assert runner.batches[:2] == [(0.0,), (4.0,)]
        assert runner.background_most == 1  # one instance at a time: the other stays free
        await queue.close(drain=True)

    run(body)


def test_background_alone_keeps_every_instance_busy() -> None:
    """An in-process batch job (no callers in the last second) uses all instances."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(capacity=2, gate=asyncio.Event())
        queue, _ = make_queue(runner, None, clock)
        caller = make_request(value=0)
        queue.submit(caller)
        await settle()
        runner.gate.set()  # type: ignore[union-attr]
        await caller.future
        runner.gate.clear()  # type: ignore[union-attr]
        clock.advance_us(1_500_000)  # the last caller left 1.5 s ago
        jobs = [background(v) for v in (1, 2, 3)]
        for r in jobs:
            queue.submit(r)
        await settle()
        assert runner.running == 2
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*(r.future for r in jobs))
        assert runner.max_running == 2
        await queue.close(drain=True)

    run(body)


def test_background_batches_are_full_when_no_caller_is_about() -> None:
    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, _ = make_queue(runner, BatchingConfig(), clock)
        first = background(0)
        queue.submit(first)
        await settle()  # the instance is busy
        jobs = [background(v, rows=2) for v in (1, 2, 3)]
        for r in jobs:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(first.future, *(r.future for r in jobs))
        assert runner.batches == [(0.0,), (1.0, 2.0, 3.0)]  # 6 rows of 8: one batch
        await queue.close(drain=True)

    run(body)


def test_a_background_deadline_is_kept_behind_callers() -> None:
    """The deadline timer watches every queued request, background work's too."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        queue, observer = make_queue(runner, BatchingConfig(), clock, max_batch=1)
        queue.submit(make_request(value=0))
        await settle()  # the instance is busy, held by the gate
        job = background(1)
        job.deadline_ns = clock.now + 3_000
        queue.submit(job)
        early = make_request(value=2, deadline_ns=clock.now + 1_000)
        queue.submit(early)
        queue.submit(make_request(value=3))
        clock.advance_us(2)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(early.future, 2)
        clock.advance_us(5)  # past the job's deadline: its timer was armed too
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(job.future, 2)
        runner.gate.set()  # type: ignore[union-attr]
        await queue.close(drain=True)
        assert ("1", "DeadlineExceeded") in observer.done

    run(body)


def test_late_callers_run_before_background_work() -> None:
    """A caller's request past its DELAY timeout still runs before background work."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner(gate=asyncio.Event())
        policy = QueuePolicy(timeout_action="DELAY", default_timeout_us=10)
        queue, _ = make_queue(runner, BatchingConfig(default_queue_policy=policy), clock)
        queue.submit(make_request(value=0))
        await settle()
        late = make_request(value=9)
        queue.submit(late)
        clock.advance_us(50)  # `late` is past its timeout: demoted, not refused
        jobs = [background(v) for v in (1, 2, 3)]
        for r in jobs:
            queue.submit(r)
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(late.future, *(r.future for r in jobs))
        assert runner.batches == [(0.0,), (9.0,), (1.0,), (2.0,), (3.0,)]
        await queue.close(drain=True)

    run(body)


def test_a_lone_background_request_does_not_wait_for_company() -> None:
    """While callers are about a background batch is one request: max_queue_delay,
    which waits for more requests to join, would only delay it."""

    async def body() -> None:
        clock, runner = FakeClock(), FakeRunner()
        queue, _ = make_queue(runner, BatchingConfig(max_queue_delay_us=50_000), clock)
        caller = make_request(value=0)
        queue.submit(caller)
        clock.advance_us(60_000)  # its delay passed: it runs
        await caller.future
        job = background(1)
        queue.submit(job)
        await asyncio.wait_for(job.future, 0.02)  # not 50 ms later
        await queue.close(drain=True)

    run(body)


def test_the_kept_instance_goes_to_background_work_once_callers_leave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import convoy.batching.queue as queue_module

    monkeypatch.setattr(queue_module, "CALLERS_RECENT_NS", 20_000_000)  # timers run in real time

    async def body() -> None:
        clock, runner = FakeClock(), CountingRunner(capacity=2, gate=asyncio.Event())
        queue, _ = make_queue(runner, None, clock)
        caller = make_request(value=0)
        queue.submit(caller)
        await settle()
        jobs = [background(1), background(2)]
        for r in jobs:
            queue.submit(r)
        await settle()
        assert runner.running == 1  # the second instance is kept for callers
        clock.advance_us(20_001)  # the caller came over 20 ms ago: gone
        await asyncio.sleep(0.1)  # the queue's timer, armed for then, plans again
        assert runner.running == 2 and runner.background_most == 1
        runner.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(caller.future, *(r.future for r in jobs))
        await queue.close(drain=True)

    run(body)


@dataclass
class TimedRunner(FakeRunner):
    """Each batch takes `row_us` of the fake clock per row."""

    clock: FakeClock = field(default_factory=FakeClock)
    row_us: int = 1000

    async def _run(self, batch: Batch) -> BatchOutcome:
        self.clock.advance_us(self.row_us * batch.rows)
        return await super()._run(batch)


def test_background_batches_take_their_share_of_compute_while_callers_are_about() -> None:
    async def body() -> None:
        clock = FakeClock()
        runner = TimedRunner(clock=clock, row_us=10_000)  # 10 ms a row
        queue = ModelQueue("m", 8, None, runner, RecordingObserver(), clock, background_share=0.1)
        queue.start()
        caller = make_request(value=0)
        queue.submit(caller)
        await caller.future  # callers are about
        jobs = [background(v) for v in (1, 2, 3)]
        for r in jobs:
            queue.submit(r)
        await settle()
        assert runner.batches == [(0.0,), (1.0,)]  # 10 ms spent: 100 ms to pay back at 0.1
        clock.advance_us(50_000)
        queue.wake()
        await settle()
        assert len(runner.batches) == 2
        clock.advance_us(50_000)
        queue.wake()
        await settle()
        assert runner.batches[2] == (2.0,)
        clock.advance_us(1_100_000)  # the callers have gone: no share, no wait
        queue.wake()
        await asyncio.gather(*(r.future for r in jobs))
        await queue.close(drain=True)

    run(body)


def test_background_requests_run_in_pieces_only_while_callers_are_about() -> None:
    async def body() -> None:
        clock = FakeClock()
        runner = TimedRunner(clock=clock, row_us=2_000)  # 2 ms a row: 2 rows per 5 ms piece
        queue = ModelQueue("m", 8, None, runner, RecordingObserver(), clock, background_share=1)
        queue.start()
        job = background(0, rows=6)
        assert queue.piece_rows(job) == 0  # no caller about
        queue.submit(job)
        await job.future  # measured: 2 ms a row
        assert queue.piece_rows(background(1, rows=6)) == 0  # no caller about: whole
        caller = make_request(value=2)
        queue.submit(caller)
        await caller.future
        assert queue.piece_rows(background(3, rows=6)) == 2
        assert queue.piece_rows(background(4, rows=2)) == 0  # no larger than a piece
        assert queue.piece_rows(make_request(rows=6, value=5)) == 0  # a caller's: whole
        asked = background(6, rows=6)
        asked.classification = {"y": 1}
        assert queue.piece_rows(asked) == 0  # ranked outputs are not joined
        clock.advance_us(1_100_000)
        assert queue.piece_rows(background(7, rows=6)) == 0  # the callers have gone
        await queue.close(drain=True)

    run(body)


def test_a_first_background_piece_of_one_row_is_the_measure() -> None:
    async def body() -> None:
        clock = FakeClock()
        runner = TimedRunner(clock=clock)
        queue = ModelQueue("m", 8, None, runner, RecordingObserver(), clock, background_share=1)
        queue.start()
        caller = make_request(value=0)
        queue.submit(caller)
        await caller.future
        assert queue.piece_rows(background(1, rows=6)) == 1
        assert queue.piece_rows(background(2, rows=1)) == 0
        await queue.close(drain=True)

    run(body)


def test_beside_callers_one_background_batch_runs_at_a_time_and_waits_are_timed() -> None:
    """No manual wake: the queue's own timer dispatches the next background batch once
    its share is paid back (the fake clock moved by a task, the timer in real time)."""

    async def body() -> None:
        clock = FakeClock()
        runner = TimedRunner(clock=clock, capacity=4, row_us=1_000)
        queue = ModelQueue("m", 8, None, runner, RecordingObserver(), clock, background_share=0.5)
        queue.start()
        caller = make_request(value=0)
        queue.submit(caller)
        await caller.future
        runner.gate = asyncio.Event()
        jobs = [background(v) for v in (1, 2, 3)]
        for r in jobs:
            queue.submit(r)
        await settle()
        assert runner.running == 1  # three instances free, one background batch
        runner.gate.set()
        await jobs[0].future  # 1 ms charged: 2 ms to wait at a share of 0.5

        async def time_passes() -> None:
            while True:
                await asyncio.sleep(0.002)
                clock.advance_us(2_000)

        ticking = asyncio.ensure_future(time_passes())
        await asyncio.wait_for(asyncio.gather(*(r.future for r in jobs[1:])), 5)
        ticking.cancel()
        assert runner.max_running == 1
        await queue.close(drain=True)

    run(body)
