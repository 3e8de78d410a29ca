"""Background work's share of the event loop while callers are about.

A background request (`convoy batch --server`, `convoy replay --server`: the request
parameter `background`) holds the server's one event loop for a third of a millisecond or
more, whatever its rows: gRPC's receive and send, decoding, the queue, the encoded answer.
A caller that arrives meanwhile waits, and the model queue's priority cannot help: that
time is spent before and after the queue. So while callers are about (one arrived at this
server in the last CALLERS_RECENT_NS, whatever the model: the loop is shared by all),
background requests may take at most a share of the loop's wall time. A `ShareBudget`
(batching/budget.py) over loop time is charged what each background request took; `BackgroundPacing`
makes a background request wait on it before it is decoded. With no caller about there is
no limit: a job alone on a server runs at full speed. Issue 27.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..batching.budget import ShareBudget
from ..errors import DeadlineExceeded
from .admission import Draining

# Why DEFAULT_BACKGROUND_LOOP_SHARE (config.py) is 0.01. On two cores beside 200 callers/s
# of `tiny`, a job at ~39 requests/s (`--rate 10000` rows/s, about 1.5% of the loop at
# ~0.38 ms a request) left the callers' p99 at x0.99 and one at
# ~117 requests/s (about 4.5%) raised it x1.18 (docs/benchmarks.md, 2026-12-07). Paced by
# the server, a share of 0.02 gave x1.03-1.10 over three runs, 0.015 x0.96-1.10 over four
# and 0.01 x0.89-1.03 over two (the job at about 5,800 rows of `tiny` a second beside the
# callers; docs/benchmarks.md): 0.01, for the margin on a machine this noisy.

# The loop time of one request that the path cannot time: gRPC's parsing, its two tasks
# per call and its send, the queue's submit and dispatch, the answered future. Measured
# (2026-12-07, this 2-core machine, `tiny`, one request at a time, the loop thread's CPU
# from /proc): 360-380 µs a request, 1 row or 256 alike, of which decoding and encoding
# 256 rows take ~13 µs timed alone; under load wake-ups are shared (docs/benchmarks.md: an
# echo server's gRPC alone 146-185 µs a request at c=32). The low end of that, rounded.
REQUEST_LOOP_NS = 300_000
# A quiet spell refills a few requests' worth, no more: a caller then waits behind at most
# ~2 ms of background work, and a steady job (always in debt) never bursts.
BURST_NS = 2_000_000
# A waiting request looks at the draining flag at least this often.
WAIT_SLICE_NS = 50_000_000


class BackgroundPacing:
    """The path's side of the budget: a background request takes its turn before it is
    decoded. Those that must wait go one at a time, in arrival order, so only the first
    of them sleeps (a crowd of waiters waking together would cost the loop what the wait
    saves). A wait ends with the turn, or DeadlineExceeded at the caller's deadline, or
    Unavailable once the server drains (as any new request is answered then: the client
    retries elsewhere). Each turn is charged REQUEST_LOOP_NS at once, so the next waiter
    sees it; the path charges what it times (decoding, observers, encoding) later."""

    def __init__(
        self,
        budget: ShareBudget,
        draining: Draining,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        request_ns: int = REQUEST_LOOP_NS,
    ) -> None:
        self.budget = budget
        self._draining = draining
        self._sleep = sleep
        self._request_ns = request_ns
        self._turns = asyncio.Lock()
        self.waiting = 0  # requests in the slow path now (waiting for the lock or the budget)
        self.waits = 0  # requests that waited, since start
        self.waited_ns = 0  # their time waiting, since start

    async def turn(self, model: str, deadline_ns: int | None) -> None:
        budget = self.budget
        if not self.waiting and budget.delay_ns() == 0:  # no queue, no debt: no await
            budget.charge(self._request_ns)
            return
        started = budget.clock()
        self.waiting += 1
        self.waits += 1
        try:
            # asyncio's timer bounds the wait behind the other waiters; the clock, ours.
            left = None if deadline_ns is None else max(0.0, (deadline_ns - started) / 1e9)
            async with asyncio.timeout(left):
                async with self._turns:
                    await self._until_allowed(model, deadline_ns)
        except TimeoutError:
            raise _late(model) from None
        finally:
            self.waiting -= 1
            self.waited_ns += budget.clock() - started
        budget.charge(self._request_ns)

    async def _until_allowed(self, model: str, deadline_ns: int | None) -> None:
        while (delay := self.budget.delay_ns()) > 0:
            if self._draining.on:
                raise self._draining.refuse()
            if deadline_ns is not None:
                left = deadline_ns - self.budget.clock()
                if left <= 0:
                    raise _late(model)
                delay = min(delay, left)
            await self._sleep(min(delay, WAIT_SLICE_NS) / 1e9)


def _late(model: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"model '{model}': the background request's deadline passed while it waited for "
        "the server's loop budget for background work (--background-loop-share)"
    )
