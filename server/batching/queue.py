"""ModelQueue: one per served model version. Owns its driver task.

Lifecycle: the owner (ServedModel) calls start() once and close() once.
submit() is called on the event loop by the frontend; batches run on a
BatchRunner (the instance pool) while the driver forms the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..config import BatchingConfig, QueuePolicy
from ..errors import ConvoyError, DeadlineExceeded, InternalError, Overloaded, Unavailable
from .batch import Batch
from .policy import BatchLimits, plan_batch
from .request import Array, InferRequest, InferResult

log = logging.getLogger(__name__)

Clock = Callable[[], int]


@dataclass(frozen=True)
class BatchOutcome:
    outputs: dict[str, Array]
    input_ns: int  # gathering inputs
    infer_ns: int  # the runtime itself
    device: str


class BatchRunner(Protocol):
    capacity: int  # batches that may run at once

    async def run(self, batch: Batch) -> BatchOutcome: ...


class QueueObserver(Protocol):
    def on_batch(self, batch: Batch, outcome: BatchOutcome, output_ns: int) -> None: ...

    def on_request_done(
        self, request: InferRequest, error: ConvoyError | None, now_ns: int
    ) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...


class ModelQueue:
    def __init__(
        self,
        name: str,
        max_batch_size: int,
        batching: BatchingConfig | None,
        runner: BatchRunner,
        observer: QueueObserver,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self.name = name
        self._batching = batching or BatchingConfig()
        self._limits = BatchLimits(
            max_batch_size=max_batch_size,
            dynamic=batching is not None,
            max_delay_ns=self._batching.max_queue_delay_us * 1000,
            preferred=self._batching.preferred_batch_sizes,
        )
        self._runner = runner
        self._observer = observer
        self._clock = clock
        levels = max(1, self._batching.priority_levels)
        # Index 0..levels-1 hold priority 1..levels; the extra last deque holds
        # DELAY-policy requests whose timeout passed: they run after all others.
        self._levels: list[deque[InferRequest]] = [deque() for _ in range(levels + 1)]
        self._depth = 0
        self._slots = asyncio.Semaphore(runner.capacity)
        self._wakeup = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[None] | None = None
        self._closed = False

    # -- the frontend's side -------------------------------------------------

    def submit(self, request: InferRequest) -> None:
        """Queue an accepted request, or raise at once (Overloaded, Unavailable)."""
        if self._closed:
            raise Unavailable(f"model '{self.name}' is unloading")
        level = self._level_of(request.priority)
        policy = self._batching.policy_for(level + 1)
        queue = self._levels[level]
        if policy.max_queue_size and len(queue) >= policy.max_queue_size:
            raise Overloaded(
                f"model '{self.name}': queue for priority {level + 1} is full "
                f"({policy.max_queue_size} requests)"
            )
        request.queue_level = level
        if request.arrival_ns == 0:
            request.arrival_ns = self._clock()
        request.deadline_ns = self._deadline(request, policy)
        queue.append(request)
        self._depth += 1
        self._observer.on_queue_depth(self._depth)
        self._wakeup.set()

    @property
    def depth(self) -> int:
        return self._depth

    def _level_of(self, priority: int) -> int:
        levels = self._batching.priority_levels
        if not levels:
            return 0
        if priority == 0:
            priority = self._batching.default_priority_level or levels
        return min(max(priority, 1), levels) - 1

    def _deadline(self, request: InferRequest, policy: QueuePolicy) -> int | None:
        default = (
            request.arrival_ns + policy.default_timeout_us * 1000
            if policy.default_timeout_us
            else None
        )
        if request.deadline_ns is None:
            return default
        if default is None or policy.allow_timeout_override:
            return request.deadline_ns
        return min(request.deadline_ns, default)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        assert self._driver is None, "ModelQueue.start() called twice"
        self._driver = asyncio.get_running_loop().create_task(
            self._drive(), name=f"convoy-queue-{self.name}"
        )

    async def close(self, drain: bool) -> None:
        """Stop accepting; with drain, finish what is queued; then stop the driver."""
        self._closed = True
        if drain:
            while self._depth and self._driver is not None and not self._driver.done():
                self._wakeup.set()
                await asyncio.sleep(0.005)
        self._fail_pending(Unavailable(f"model '{self.name}' was unloaded before this ran"))
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # -- the driver ----------------------------------------------------------

    def _pending(self) -> Iterator[InferRequest]:
        for queue in self._levels:
            yield from queue

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch(loop)
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> Batch:
        while True:
            self._wakeup.clear()
            now = self._clock()
            self._sweep(now)
            plan = plan_batch(self._pending(), now, self._limits)
            if plan.take:
                self._remove(plan.take, now)
                return Batch(requests=plan.take, batched=self._limits.max_batch_size > 0)
            timer = None
            if plan.wake_at_ns is not None:
                delay = max(0.0, (plan.wake_at_ns - now) / 1e9)
                timer = loop.call_later(delay, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _sweep(self, now: int) -> None:
        """Drop requests whose caller left; answer or demote those past their deadline."""
        for level, queue in enumerate(self._levels):
            if not queue:
                continue
            keep: deque[InferRequest] = deque()
            changed = False
            for request in queue:
                if request.abandoned:
                    changed = True
                    continue
                if request.deadline_ns is not None and now >= request.deadline_ns:
                    changed = True
                    policy = self._batching.policy_for(level + 1)
                    if policy.timeout_action == "DELAY" and level < len(self._levels) - 1:
                        request.deadline_ns = None
                        self._levels[-1].append(request)
                        continue
                    self._answer_error(
                        request,
                        DeadlineExceeded(
                            f"model '{self.name}': request timed out in the queue "
                            f"after {(now - request.arrival_ns) / 1e6:.1f} ms"
                        ),
                        now,
                    )
                    continue
                keep.append(request)
            if changed:
                self._levels[level] = keep
        depth = sum(len(q) for q in self._levels)
        if depth != self._depth:
            self._depth = depth
            self._observer.on_queue_depth(depth)

    def _remove(self, taken: tuple[InferRequest, ...], now: int) -> None:
        ids = {id(r) for r in taken}
        for level, queue in enumerate(self._levels):
            if any(id(r) in ids for r in queue):
                self._levels[level] = deque(r for r in queue if id(r) not in ids)
        for request in taken:
            request.dispatch_ns = now
        self._depth -= len(taken)
        self._observer.on_queue_depth(self._depth)

    async def _execute(self, batch: Batch) -> None:
        try:
            outcome = await self._runner.run(batch)
            start = self._clock()
            per_request = batch.split_outputs(outcome.outputs)
            now = self._clock()
            self._observer.on_batch(batch, outcome, now - start)
            for request, outputs in zip(batch.requests, per_request, strict=True):
                if not request.future.done():
                    request.future.set_result(InferResult(outputs))
                self._observer.on_request_done(request, None, now)
        except ConvoyError as exc:
            self._fail_batch(batch, exc)
        except Exception as exc:  # a backend bug must not lose the batch's answers
            log.exception("model '%s': batch of %d failed", self.name, batch.rows)
            self._fail_batch(batch, InternalError(f"model '{self.name}' failed: {exc}"))
        finally:
            self._slots.release()

    def _fail_batch(self, batch: Batch, error: ConvoyError) -> None:
        now = self._clock()
        for request in batch.requests:
            self._answer_error(request, error, now)

    def _answer_error(self, request: InferRequest, error: ConvoyError, now: int) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._observer.on_request_done(request, error, now)

    def _fail_pending(self, error: ConvoyError) -> None:
        now = self._clock()
        for queue in self._levels:
            while queue:
                self._answer_error(queue.popleft(), error, now)
        self._depth = 0
        self._observer.on_queue_depth(0)
