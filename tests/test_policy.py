"""Batch formation, driven by a fake clock: no threads, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from convoy.batching.policy import BatchLimits, plan_batch

from .fakes import make_request


@pytest.fixture(autouse=True)
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()


LIMITS = BatchLimits(max_batch_size=8, dynamic=True, max_delay_ns=1_000_000)


def test_empty_queue_waits_for_arrivals() -> None:
    plan = plan_batch([], 0, LIMITS)
    assert plan.take == () and plan.wake_at_ns is None


def test_waits_until_the_head_has_waited_max_delay() -> None:
    queue = [make_request(arrival_ns=100), make_request(arrival_ns=200)]
    plan = plan_batch(queue, 500, LIMITS)
    assert plan.take == () and plan.wake_at_ns == 100 + 1_000_000
    plan = plan_batch(queue, 100 + 1_000_000, LIMITS)
    assert plan.take == tuple(queue)


def test_full_batch_goes_at_once_and_never_exceeds_max() -> None:
    queue = [make_request(rows=3, value=i) for i in range(4)]
    plan = plan_batch(queue, 0, LIMITS)
    assert [r.rows for r in plan.take] == [3, 3]  # 9 rows would exceed 8


def test_exactly_max_rows() -> None:
    queue = [make_request(rows=4), make_request(rows=4), make_request(rows=1)]
    assert len(plan_batch(queue, 0, LIMITS).take) == 2


def test_preferred_size_cuts_the_batch() -> None:
    limits = BatchLimits(max_batch_size=16, dynamic=True, max_delay_ns=10**9, preferred=(2, 4))
    queue = [make_request(value=i) for i in range(5)]
    plan = plan_batch(queue, 0, limits)
    assert len(plan.take) == 4  # the largest preferred size, no waiting
    assert plan_batch(queue[:3], 0, limits).take == ()  # 3 < 4: wait for more


def test_shapes_never_mix() -> None:
    queue = [
        make_request(shape=(4,), value=0),
        make_request(shape=(5,), value=1),
        make_request(shape=(4,), value=2),
    ]
    plan = plan_batch(queue, 10**9 * 10, LIMITS)
    assert [r.id for r in plan.take] == ["0", "2"]


def test_without_dynamic_batching_each_request_runs_alone() -> None:
    limits = BatchLimits(max_batch_size=8, dynamic=False)
    queue = [make_request(), make_request()]
    assert len(plan_batch(queue, 0, limits).take) == 1
    unbatched = BatchLimits(max_batch_size=0, dynamic=True)
    assert len(plan_batch(queue, 0, unbatched).take) == 1


def test_zero_delay_takes_what_is_there() -> None:
    limits = BatchLimits(max_batch_size=8, dynamic=True, max_delay_ns=0)
    queue = [make_request(), make_request(), make_request()]
    assert len(plan_batch(queue, 0, limits).take) == 3
