"""ModelQueue: one per served model version.

Driven by callbacks on the event loop, not by a task: a submit schedules one
"pump" for the end of the current loop iteration (so requests that arrive
together batch together), a finished batch pumps again, and a timer pumps when
the oldest request has waited max_queue_delay. The pump forms batches while an
instance is free. Lifecycle: the owner (ServedModel) calls start() once and
close() once; close() cancels the timer and awaits the batches in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..config import BatchingConfig, QueuePolicy
from ..errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InternalError,
    Overloaded,
    Unavailable,
)
from ..tensors import Array, Ranked
from .batch import Batch
from .budget import CALLERS_RECENT_NS, ShareBudget
from .policy import WAIT, BatchLimits, BatchPlan, plan_batch
from .request import InferRequest, InferResult
from .slo import SloController

log = logging.getLogger(__name__)

Clock = Callable[[], int]


# The instance time background batches may take at once when callers arrive: none past
# what they are charged as they finish (a batch runs, then its time is paid back).
COMPUTE_BURST_NS = 0
# While callers are about, a background request runs in pieces of about this much
# compute (piece_rows): a caller's batch beside one on shared cores is slowed for that
# long at most. image_classifier on 2 cores: 64-row background batches (~80 ms) raised
# the callers' p99 x2.7 at a 5 % compute share, 4-row ones x0.99 (docs/benchmarks.md).
PIECE_NS = 5_000_000
# How much each batch moves the queue's estimate of a row's compute time.
ROW_NS_WEIGHT = 0.2


@dataclass(frozen=True)
class BatchOutcome:
    outputs: dict[str, Array]
    input_ns: int  # gathering inputs
    infer_ns: int  # the runtime itself (and ranking for classification)
    device: str
    ranked: dict[str, Ranked] = field(default_factory=dict)
    # Set by a backend that answers per request: one answer per request of the batch,
    # in order; an error fails only its own request. outputs/ranked are then unused.
    answers: tuple[InferResult | ConvoyError, ...] | None = None


# Called once per batch, on the loop, with its outcome or the exception its run raised.
BatchDone = Callable[[BatchOutcome | BaseException], None]


class BatchRunner(Protocol):
    @property
    def capacity(self) -> int:
        """Batches that may run at once now (read at every batch formed)."""
        ...

    def submit(self, batch: Batch, done: BatchDone) -> None:
        """Start the batch on a free instance (never called with none free); `done`
        is called once, from a later loop callback, never from within submit. A
        callback rather than a future: the instance's answer reaches the queue in the
        same loop turn, with no future and no extra turn per batch in between."""
        ...


class BatchTracer(Protocol):
    def batch_done(self, batch: Batch, outcome: BatchOutcome | BaseException, end_ns: int) -> None:
        """Once per batch run, on the loop, after its callers were answered; never raises
        (a span for it where it held a sampled request: inference/tracing.py)."""
        ...


class QueueObserver(Protocol):
    def on_batch(self, batch: Batch, outcome: BatchOutcome, output_ns: int) -> None: ...

    def on_request_done(
        self, request: InferRequest, error: ConvoyError | None, now_ns: int
    ) -> None: ...


class ModelQueue:
    def __init__(
        self,
        name: str,
        max_batch_size: int,
        batching: BatchingConfig | None,
        runner: BatchRunner,
        observer: QueueObserver,
        clock: Clock = time.monotonic_ns,
        slo_target_ns: int | None = None,
        default_max_queue_size: int = 0,
        background_share: float | None = None,
    ) -> None:
        self.name = name
        self._batching = batching or BatchingConfig()
        self._limits = BatchLimits(
            max_batch_size=max_batch_size,
            dynamic=batching is not None,
            max_delay_ns=self._batching.max_queue_delay_us * 1000,
            preferred=self._batching.preferred_batch_sizes,
        )
        self._default_max_queue = default_max_queue_size
        self._runner = runner
        self._observer = observer
        self._clock = clock
        self.slo: SloController | None = None
        self.tracer: BatchTracer | None = None  # set by the repository while tracing is on
        if slo_target_ns and batching is not None and max_batch_size > 0:
            self.slo = SloController(slo_target_ns, max_batch_size, self._limits.max_delay_ns)
            self._apply_slo()
        levels = max(1, self._batching.priority_levels)
        # Index 0..levels-1 hold priority 1..levels; then callers' DELAY-policy requests
        # whose timeout passed (they run after all other callers'); then background work
        # (batch jobs, replays, shadow copies), behind every caller's.
        self._late, self._background = levels, levels + 1
        self._levels: list[deque[InferRequest]] = [deque() for _ in range(levels + 2)]
        self._depth = 0
        self._busy = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_pending = False
        self._timer: asyncio.TimerHandle | None = None
        # One timer for the earliest queued deadline, so an expired request is answered
        # on time even while every instance is busy and no batch forms.
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at: int | None = None
        self._running: dict[int, Batch] = {}  # by ticket: dispatched, not yet answered
        self._idle: asyncio.Event | None = None
        # preserve_ordering: answers are released in dispatch order.
        self._ordered = self._batching.preserve_ordering and runner.capacity > 1
        self._next_ticket = 0
        self._release_ticket = 0
        self._held: dict[int, Callable[[], None]] = {}
        self._closed = False
        self._refusal: ConvoyError | None = None  # set by stop_accepting()
        self._caller_seen_ns = -CALLERS_RECENT_NS - 1  # the last caller's (not background) arrival
        # While callers are about, background batches take at most this share of the
        # instances' time: one running beside a caller's slows it (shared cores, a shared
        # GPU) whatever the order of the queue. None: no limit.
        self._compute: ShareBudget | None = None
        if background_share is not None:
            self._compute = ShareBudget(background_share, COMPUTE_BURST_NS, clock)
        self._row_ns = 0.0  # a background row's compute time, from those run (0: none yet)
        self._pieced = 0  # background requests running in pieces (pieces()): a drain waits
        self._draining = False  # close(drain=True) runs: a pieced request's next piece is taken

    # -- the frontend's side -------------------------------------------------

    def submit(self, request: InferRequest) -> None:
        """Queue an accepted request, or raise at once (Overloaded, Unavailable)."""
        if self._refusal is not None:
            raise self._refusal
        if (self._closed and not (request.piece and self._draining)) or self._loop is None:
            raise Unavailable(f"model '{self.name}' is not accepting requests")
        # Background work waits in the last deque, behind every caller's request.
        level = self._background if request.background else self._level_of(request.priority)
        policy = self._batching.policy_for(level + 1)
        limit = policy.max_queue_size or self._default_max_queue
        if limit and len(self._levels[level]) >= limit:
            # Callers that left and requests past their deadline must not hold places.
            self._sweep(self._clock())
        queue = self._levels[level]
        if limit and len(queue) >= limit:
            which = "background work" if request.background else f"priority {level + 1}"
            raise Overloaded(f"model '{self.name}': queue for {which} is full ({limit} requests)")
        request.queue_level = level
        if request.arrival_ns == 0:
            request.arrival_ns = self._clock()
        if not request.background:
            self._caller_seen_ns = self._clock()  # not arrival_ns: set before a model's load
            if self._compute is not None:  # caller_arrived, without a call per caller
                self._compute.callers_seen_ns = self._caller_seen_ns
        request.deadline_ns = self._deadline(request, policy)
        queue.append(request)
        self._depth += 1
        if request.deadline_ns is not None:
            self._arm_deadline(request.deadline_ns)
        self._schedule_pump()

    def stop_accepting(self, error: ConvoyError) -> None:
        """Nothing can run this model any more: answer everything queued with `error`
        and refuse new requests with it at once, instead of letting them wait."""
        self._refusal = error
        self._fail_pending(error)
        self.wake()

    def wake(self) -> None:
        """The runner's capacity may have grown: form batches again."""
        self._schedule_pump()

    @property
    def limits(self) -> BatchLimits:
        return self._limits

    def _apply_slo(self) -> None:
        assert self.slo is not None
        self._limits = BatchLimits(
            max_batch_size=self.slo.batch_limit,
            dynamic=True,
            max_delay_ns=self.slo.delay_ns,
            preferred=tuple(
                p for p in self._batching.preferred_batch_sizes if p <= self.slo.batch_limit
            ),
        )

    @property
    def depth(self) -> int:
        return self._depth

    def piece_rows(self, request: InferRequest) -> int:
        """Rows per piece for a background request while callers are about (0: run it
        whole): about PIECE_NS of compute each, by the background rows run so far (before
        any, a first piece of one row is the measure). Only where background work is
        budgeted (--background-compute-share), and not for a request asking for
        classification (its ranked outputs are not joined)."""
        if (
            not request.background
            or self._compute is None
            or self._limits.max_batch_size <= 0
            or request.classification
            or self._clock() - self._caller_seen_ns > CALLERS_RECENT_NS
        ):
            return 0
        if self._row_ns <= 0:  # not measured yet: a first piece of one row is the measure
            return 1 if request.rows > 1 else 0
        rows = max(1, int(PIECE_NS // self._row_ns))
        return rows if rows < request.rows else 0

    @contextlib.contextmanager
    def pieces(self) -> Iterator[None]:
        """Around a background request run in pieces (ServedModel.infer): a drain waits
        for its last piece, and takes its pieces meanwhile."""
        self._pieced += 1
        try:
            yield
        finally:
            self._pieced -= 1
            if self._idle is not None and not (self._depth or self._busy or self._pieced):
                self._idle.set()

    def cancelled(self) -> Cancelled:
        """The error of a request its caller cancelled, as the queue counts it."""
        return Cancelled(f"model '{self.name}': the caller cancelled the request")

    @property
    def busy(self) -> int:
        return self._busy

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
        assert self._loop is None, "ModelQueue.start() called twice"
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()

    async def close(self, drain: bool, timeout_s: float | None = None) -> None:
        """Stop accepting; with drain, run what is queued; then await batches in flight.

        Bounded by timeout_s (the server's grace period): what has not finished by
        then is answered UNAVAILABLE, so an unload or SIGTERM never hangs on a stuck
        instance.
        """
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        if drain and self._idle is not None and (self._depth or self._busy or self._pieced):
            self._draining = True
            try:
                await asyncio.wait_for(self._drained(), timeout_s)
            except TimeoutError:
                log.warning(
                    "model '%s': drain passed %.1f s; failing the rest", self.name, timeout_s
                )
            finally:
                self._draining = False
        for timer in (self._timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._fail_pending(Unavailable(f"model '{self.name}' was unloaded before this ran"))
        if self._running and self._idle is not None:
            # Nothing is queued now: the idle event is set once the last batch returns.
            left = None if deadline is None else max(0.0, deadline - loop.time())
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
        stuck = Unavailable(f"model '{self.name}' was unloaded while this batch was running")
        for batch in list(self._running.values()):
            self._fail_batch(batch, stuck)
        # With preserve_ordering, batches that finished behind a stuck one are held
        # for it; it has just been answered, so they are released now, in order.
        for ticket in sorted(self._held):
            self._held.pop(ticket)()
        self._release_ticket = self._next_ticket

    async def _drained(self) -> None:
        assert self._idle is not None
        while self._depth or self._busy or self._pieced:
            self._idle.clear()
            self._schedule_pump()
            await self._idle.wait()

    # -- batch formation -------------------------------------------------------

    def _schedule_pump(self) -> None:
        if not self._pump_pending and self._loop is not None:
            self._pump_pending = True
            self._loop.call_soon(self._pump)

    def _callers(self) -> Iterator[InferRequest]:
        """Callers' queued requests (every deque but background work's), in order."""
        for queue in self._levels[: self._background]:
            yield from queue

    def _plan(self, now: int) -> BatchPlan:
        """The next batch. Callers' requests first, and never beside background work: a
        caller's batch computes no background rows (DESIGN §13). While callers are about
        (one came in the last CALLERS_RECENT_NS), background work never takes the last
        free instance, so a caller's request finds one free, and it runs one request a
        batch: a caller that arrives behind it waits for that request's rows only, which
        its sender sizes (`convoy batch --batch-size`). A job alone (in-process `convoy
        batch`) keeps every instance busy with full batches."""
        background = self._levels[self._background]
        if self._depth > len(background):
            return plan_batch(self._callers(), now, self._limits)
        if not background:
            return WAIT
        callers_until = self._caller_seen_ns + CALLERS_RECENT_NS
        if now > callers_until:
            return plan_batch(background, now, self._limits)
        if self._busy and self._busy >= self._runner.capacity - 1:
            return BatchPlan(take=(), wake_at_ns=callers_until + 1)  # the instance is theirs
        if self._compute is not None:
            if any(b.requests[0].background for b in self._running.values() if b.requests):
                return WAIT  # one background batch at a time beside callers; its end pumps
            if wait := self._compute.delay_ns(now):
                return BatchPlan(take=(), wake_at_ns=now + wait)  # its share spent
        return BatchPlan(take=(background[0],))

    def _pump(self) -> None:
        self._pump_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._depth and self._busy < self._runner.capacity:
            now = self._clock()
            self._sweep(now)
            plan = self._plan(now)
            if not plan.take:
                if plan.wake_at_ns is not None and self._loop is not None:
                    delay = max(0.0, (plan.wake_at_ns - now) / 1e9)
                    self._timer = self._loop.call_later(delay, self._schedule_pump)
                break
            self._remove(plan.take, now)
            self._dispatch(Batch(requests=plan.take, batched=self._limits.max_batch_size > 0))
        if self._idle is not None and not (self._depth or self._busy or self._pieced):
            self._idle.set()

    def _arm_deadline(self, deadline_ns: int) -> None:
        if self._loop is None or (
            self._deadline_at is not None and self._deadline_at <= deadline_ns
        ):
            return
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_at = deadline_ns
        delay = max(0.0, (deadline_ns - self._clock()) / 1e9)
        self._deadline_timer = self._loop.call_later(delay, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        self._deadline_at = None
        self._sweep(self._clock())
        upcoming = [r.deadline_ns for q in self._levels for r in q if r.deadline_ns is not None]
        if upcoming:
            self._arm_deadline(min(upcoming))
        self._schedule_pump()

    def _sweep(self, now: int) -> None:
        """Drop requests whose caller left; answer or demote those past their deadline."""
        for level, queue in enumerate(self._levels):
            # Runs at every batch formed: usually nothing is due, so nothing is copied.
            if not any(_due(request, now) for request in queue):
                continue
            keep: deque[InferRequest] = deque()
            changed = False
            for request in queue:
                if request.abandoned:
                    changed = True
                    self._settle(request, self.cancelled(), now)
                    continue
                if request.deadline_ns is not None and now >= request.deadline_ns:
                    changed = True
                    policy = self._batching.policy_for(level + 1)
                    if policy.timeout_action == "DELAY" and level < self._late:
                        request.deadline_ns = None
                        self._levels[self._late].append(request)
                        continue
                    self._settle(
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
        self._depth = sum(len(q) for q in self._levels)

    def _remove(self, taken: tuple[InferRequest, ...], now: int) -> None:
        # `taken` is in queue order (levels in turn): usually a prefix of the queue.
        count = len(taken)
        done = 0
        for queue in self._levels:
            while done < count and queue and queue[0] is taken[done]:
                queue.popleft()
                done += 1
            if done == count:
                break
        if done < count:  # the batch skipped requests (another shape): filter the rest out
            ids = {id(r) for r in taken[done:]}
            for level, queue in enumerate(self._levels):
                if any(id(r) in ids for r in queue):
                    self._levels[level] = deque(r for r in queue if id(r) not in ids)
        for request in taken:
            request.dispatch_ns = now
        self._depth -= count

    # -- execution -------------------------------------------------------------

    def _dispatch(self, batch: Batch) -> None:
        self._busy += 1
        ticket = self._next_ticket
        self._next_ticket += 1
        self._running[ticket] = batch
        self._runner.submit(batch, functools.partial(self._finished, batch, ticket))

    def _finished(self, batch: Batch, ticket: int, outcome: BatchOutcome | BaseException) -> None:
        self._running.pop(ticket, None)
        self._busy -= 1
        first = batch.requests[0] if batch.requests else None
        if first is not None and first.dispatch_ns:
            ran = self._clock() - first.dispatch_ns
            if self._compute is not None and first.background:
                self._compute.charge(ran)
                # Background batches only: a caller's one-row batch is mostly the cost of a
                # batch, and pieces sized by it would be needlessly small.
                if isinstance(outcome, BatchOutcome):  # a failure's time says nothing
                    row = ran / max(1, batch.rows)
                    self._row_ns += ROW_NS_WEIGHT * (row - self._row_ns) if self._row_ns else row
        try:
            answer = self._answer_batch(batch, outcome)
            # A ticket below the release mark was failed by close() while stuck.
            if self._ordered and ticket >= self._release_ticket:
                self._held[ticket] = answer
                while self._release_ticket in self._held:
                    self._held.pop(self._release_ticket)()
                    self._release_ticket += 1
            else:
                answer()
        finally:
            if self.tracer is not None:
                self.tracer.batch_done(batch, outcome, self._clock())
            self._pump()  # the next batch goes out even if answering this one failed

    def _answer_batch(
        self, batch: Batch, outcome: BatchOutcome | BaseException
    ) -> Callable[[], None]:
        """Split the outcome now; return the step that resolves the callers' futures."""
        try:
            if isinstance(outcome, BaseException):
                raise outcome  # answered below like a failure of the split
            ran = outcome
            start = self._clock()
            per_request: list[InferResult | ConvoyError]
            if ran.answers is not None:
                per_request = list(ran.answers)
            else:
                per_request = list(batch.split_outputs(ran.outputs, ran.ranked))
            if len(per_request) != len(batch.requests):
                raise InternalError(
                    f"model '{self.name}': {len(per_request)} answers for a batch "
                    f"of {len(batch.requests)} requests"
                )
            output_ns = self._clock() - start
        except ConvoyError as exc:
            error: ConvoyError = exc
            return lambda: self._fail_batch(batch, error)
        except Exception as exc:  # a backend bug must not lose the batch's answers
            log.error("model '%s': batch of %d rows failed: %r", self.name, batch.rows, exc)
            internal = InternalError(f"model '{self.name}' failed: {exc}")
            return lambda: self._fail_batch(batch, internal)

        def resolve() -> None:
            now = self._clock()
            try:
                self._observer.on_batch(batch, ran, output_ns)
            except Exception:  # statistics must not cost the callers their answers
                log.exception("model '%s': recording a batch failed", self.name)
            slo_changed = False
            for request, result in zip(batch.requests, per_request, strict=True):
                if request.future.cancelled():
                    # The caller left while its batch ran: a cancellation, not a success.
                    self._settle(request, self.cancelled(), now)
                    continue
                self._settle(request, result, now)
                # Background work's latency is its waits behind callers: not the callers'.
                if (
                    self.slo is not None
                    and not isinstance(result, ConvoyError)
                    and not request.background
                ):
                    slo_changed |= self.slo.observe(now - request.arrival_ns)
            if slo_changed:
                self._apply_slo()

        return resolve

    def _fail_batch(self, batch: Batch, error: ConvoyError) -> None:
        now = self._clock()
        for request in batch.requests:
            self._settle(request, error, now)

    def _settle(self, request: InferRequest, answer: InferResult | ConvoyError, now: int) -> None:
        """The one place a request is answered and counted: at most once each, however
        many paths (drain timeout, late batch, cancellation) reach it."""
        if request.settled:
            return
        request.settled = True
        future = request.future
        error: ConvoyError | None = None
        if isinstance(answer, ConvoyError):
            error = answer
            if not future.done():
                future.set_exception(answer)
        elif not future.done():
            future.set_result(answer)
        try:
            self._observer.on_request_done(request, error, now)
        except Exception:  # the caller has its answer; the rest of the batch gets theirs
            log.exception("model '%s': recording a request failed", self.name)

    def _fail_pending(self, error: ConvoyError) -> None:
        now = self._clock()
        for queue in self._levels:
            while queue:
                request = queue.popleft()
                self._settle(request, self.cancelled() if request.abandoned else error, now)
        self._depth = 0


def _due(request: InferRequest, now: int) -> bool:
    """The sweep has work with this request: its caller left, or its deadline passed."""
    return request.future.done() or (request.deadline_ns is not None and now >= request.deadline_ns)
