"""InstancePool: a model's instances, each a backend on its own thread.

The pool's capacity (the instance count from config.pbtxt instance_group) is
how many batches of the model run at once. Backends release the GIL while
they compute, so instances run in parallel while the event loop stays free.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from convoy.kernels.classify import format_classes

from ..backends import Backend
from ..backends.base import (
    AddedInputs,
    RanksOnDevice,
    RequestInputs,
    RunsRequests,
    StagesInputs,
)
from ..backends.ranking import rank_on_host
from ..batching.batch import Batch
from ..batching.queue import BatchDone, BatchOutcome
from ..batching.request import InferResult
from ..errors import ConvoyError, InternalError, Unavailable
from ..tensors import Array, Ranked, Ranking
from .devices import is_device_fault, is_fatal_device_fault
from .health import DeviceHealth

log = logging.getLogger(__name__)

_STOP = None

# What an instance's thread is handed: a batch, its callback, and the loop to call it on.
_Handed = tuple[Batch, BatchDone, asyncio.AbstractEventLoop]


class ModelInstance:
    """One backend and the thread that owns it.

    A bare thread fed by a SimpleQueue, rather than a ThreadPoolExecutor: the
    hand-off is one queue put and one call_soon_threadsafe that hands the outcome
    straight to the caller's callback (no future in between), which matters when
    the model itself takes microseconds.
    """

    def __init__(
        self,
        name: str,
        backend: Backend,
        softmax_outputs: frozenset[str] = frozenset(),
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.softmax_outputs = softmax_outputs  # classification by probability, not score
        self.labels = labels or {}  # output -> class labels (label_filename)
        # Fixed for the backend's life; read for every batch placed.
        self.device: str = backend.device
        self.on_gpu: bool = backend.device.startswith("cuda")
        # Resolved once: a runtime-checkable isinstance costs ~15 µs, too much per batch.
        self._buffers = backend.input_buffer if isinstance(backend, StagesInputs) else None
        self._ranker = backend if isinstance(backend, RanksOnDevice) and self.on_gpu else None
        self._per_request = backend if isinstance(backend, RunsRequests) else None
        self.retired = False
        self._inbox: queue.SimpleQueue[_Handed | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, batch: Batch, done: BatchDone) -> None:
        """Run `batch` on this instance's thread; `done` is called once, on the running
        loop, with the outcome or the exception that the run raised."""
        self._inbox.put((batch, done, asyncio.get_running_loop()))

    def execute(self, batch: Batch) -> BatchOutcome:
        """Gather, run, rank, time. Runs on this instance's thread."""
        if self._per_request is not None:
            return self._execute_per_request(self._per_request, batch)
        start = time.monotonic_ns()
        inputs = batch.gather_inputs(self._buffers)
        gathered = time.monotonic_ns()
        full = batch.output_names
        rankings = {
            name: Ranking(k, name in self.softmax_outputs, batch.batched)
            for name, k in batch.classification.items()
        }
        if not rankings:
            outputs = self.backend.run(inputs, full)
            ranked: dict[str, Ranked] = {}
        elif self._ranker is not None:
            outputs, ranked = self._ranker.run_ranked(inputs, full, rankings)
        else:
            outputs = self.backend.run(inputs, (*full, *(n for n in rankings if n not in full)))
            ranked = rank_on_host(outputs, rankings)
            outputs = {n: outputs[n] for n in full}
        if ranked:
            # Formatted here, once per batch, so the event loop only slices strings.
            ranked = {
                name: Ranked(
                    r.values, r.indices, format_classes(r.values, r.indices, self.labels.get(name))
                )
                for name, r in ranked.items()
            }
        done = time.monotonic_ns()
        return BatchOutcome(
            outputs=outputs,
            input_ns=gathered - start,
            infer_ns=done - gathered,
            device=self.device,
            ranked=ranked,
        )

    def _execute_per_request(self, backend: RunsRequests, batch: Batch) -> BatchOutcome:
        """Each request's own inputs, no gathering; each answered on its own."""
        start = time.monotonic_ns()
        answers = backend.run_requests(
            [RequestInputs(r.id, r.inputs, r.outputs) for r in batch.requests]
        )
        if len(answers) != len(batch.requests):
            raise InternalError(
                f"instance {self.name}: {len(answers)} answers for {len(batch.requests)} requests"
            )
        ran = time.monotonic_ns()
        results: list[InferResult | ConvoyError] = []
        for request, answer in zip(batch.requests, answers, strict=True):
            if isinstance(answer, ConvoyError):
                results.append(answer)
                continue
            added: dict[str, Array] = {}
            if isinstance(answer, AddedInputs):
                added, answer = answer.inputs, answer.outputs
            ranked: dict[str, Ranked] = {}
            if request.classification:
                rankings = {
                    name: Ranking(k, name in self.softmax_outputs, batch.batched)
                    for name, k in request.classification.items()
                }
                ranked = {
                    name: Ranked(
                        r.values,
                        r.indices,
                        format_classes(r.values, r.indices, self.labels.get(name)),
                    )
                    for name, r in rank_on_host(answer, rankings).items()
                }
            full = {n: answer[n] for n in request.outputs if n not in request.classification}
            results.append(InferResult(full, ranked, added))
        return BatchOutcome(
            outputs={}, input_ns=0, infer_ns=ran - start, device=self.device, answers=tuple(results)
        )

    def _serve(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            batch, done, loop = item
            outcome: BatchOutcome | BaseException
            try:
                outcome = self.execute(batch)
            except BaseException as exc:  # delivered to the submitter's callback
                outcome = _deliverable(exc)
            try:
                loop.call_soon_threadsafe(done, outcome)
            except RuntimeError:  # the loop was closed: nobody is waiting any more
                pass
            # Hold nothing of this batch while waiting for the next: its inputs may be
            # views of a client's shared memory, or large.
            del item, batch, done, loop, outcome
        # The thread that ran the backend releases it, also when the instance was
        # retired mid-batch: its memory (GPU memory too) is freed once the call returns.
        try:
            self.backend.close()
        except Exception:
            log.exception("instance %s: closing its backend failed", self.name)

    def retire(self) -> None:
        """Abandon a stuck instance: its thread exits, closing the backend, if its
        call ever returns."""
        self.retired = True
        self._inbox.put(_STOP)

    def stop(self) -> None:
        """Tell the thread to stop once the batch in hand is done; returns at once."""
        self._inbox.put(_STOP)

    def close(self, timeout_s: float | None = None) -> bool:
        """Blocking: finish the batch in hand, stop the thread, release the backend.
        False if the thread is still in a call after timeout_s: it is abandoned and
        releases the backend when (if) the call returns."""
        self.stop()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("instance %s still running after %.1f s; abandoned", self.name, timeout_s)
            return False
        return True


def _closed() -> Unavailable:
    return Unavailable("the model is being unloaded; its instances have stopped")


def _deliverable(exc: BaseException) -> BaseException:
    """What a future can carry: asyncio refuses StopIteration, and SystemExit or
    KeyboardInterrupt from a backend must not stop the server's loop; either way the
    batch still gets its one answer (an internal error)."""
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        return exc
    return RuntimeError(f"the backend raised {exc!r}")


InstanceFactory = Callable[[str], ModelInstance]  # device -> a new instance (blocking)


@dataclass
class _Job:
    """One batch the queue handed over, from submit to its one answer."""

    batch: Batch
    done: BatchDone  # the queue's callback
    enqueued: float  # monotonic seconds
    answered: bool = False

    def answer(self, outcome: BatchOutcome | BaseException) -> None:
        if self.answered:
            return
        self.answered = True
        try:
            self.done(outcome)
        except Exception:
            # A bug in the queue's callback must not stop the pool halfway through its
            # bookkeeping (other waiting batches answered, a replacement built, a pump).
            log.exception("the queue's callback raised on a batch of %d rows", self.batch.rows)


@dataclass
class _Run:
    """One batch on one instance, from hand-off to the instance's answer."""

    instance: ModelInstance
    job: _Job
    timer: asyncio.TimerHandle | None = None  # the execution timeout, where one is set
    returned: bool = False  # the instance has answered
    started_ns: int = 0  # monotonic, when handed to the instance


@dataclass
class Breaker:
    """Circuit breaker of one GPU instance: open after a device fault, probed after back-off."""

    base_s: float
    cap_s: float
    failures: int = 0
    open_until: float = 0.0  # monotonic seconds

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def trip(self, now: float) -> float:
        self.failures += 1
        backoff = float(min(self.cap_s, self.base_s * 2.0 ** (self.failures - 1)))
        self.open_until = now + backoff
        return backoff

    def reset(self) -> None:
        self.failures = 0
        self.open_until = 0.0


class InstancePool:
    """Hands batches to free instances, GPU instances first.

    capacity is what the model's queue may dispatch at once: the instances that
    take ordinary batches now (healthy GPU instances; CPU ones only where they are
    not merely the GPUs' fallback), so batches wait in the queue, visible to
    deadlines and the SLO controller, not inside the pool. on_change tells the
    queue when capacity grows; on_lost when nothing can serve the model any more
    (no instance left, or only instances on failed devices).

    Device faults: a GPU instance whose batch fails with a device error (CUDA
    error, GPU out of memory) is taken out of service behind a circuit breaker
    and its batch is retried once on a CPU instance; after a back-off (doubling
    up to a cap) the instance gets the next batch as a probe, and a success puts
    it back in service. Execution timeout: a batch still running after it is
    answered UNAVAILABLE, the stuck instance is retired (its thread cannot be
    killed; it is abandoned) and a replacement is built off the event loop.
    """

    def __init__(
        self,
        instances: list[ModelInstance],
        factory: InstanceFactory | None = None,
        execution_timeout_s: float | None = None,
        backoff_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        cpu_spill_after_s: float | None = None,
        health: DeviceHealth | None = None,
    ) -> None:
        if not instances:
            raise ValueError("an InstancePool needs at least one instance")
        self.instances = list(instances)
        self.replaced = 0
        self.on_change: Callable[[], None] | None = None
        self.on_lost: Callable[[ConvoyError], None] | None = None
        # Told (device, ns) of each batch's time on its instance, failed ones too: the
        # busy time that convoy cost divides among models.
        self.on_busy: Callable[[str, int], None] | None = None
        self.lost: ConvoyError | None = None
        self._health = health or DeviceHealth()
        self._health.subscribe(self._device_failed)
        self._free: list[ModelInstance] = list(instances)
        self._waiting: deque[_Job] = deque()
        self._factory = factory
        self._timeout = execution_timeout_s
        self._replacements: set[asyncio.Future[ModelInstance]] = set()
        self._fallback: deque[_Job] = deque()
        self._breakers: dict[int, Breaker] = {}
        self._backoff = (backoff_s, backoff_cap_s)
        self.fallbacks = 0  # batches retried on the CPU after a device fault
        self.spills = 0  # batches sent to the CPU because the GPUs stayed busy
        self._spill_after = cpu_spill_after_s
        self._spill_timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def capacity(self) -> int:
        if not any(i.on_gpu for i in self.instances):
            return len(self.instances)
        now = time.monotonic()
        healthy = sum(1 for i in self.instances if i.on_gpu and self._gpu_usable(i, now))
        cpus = sum(1 for i in self.instances if not i.on_gpu)
        if healthy == 0 or self._spill_after is not None:
            return healthy + cpus
        return healthy

    def submit(self, batch: Batch, done: BatchDone) -> None:
        """Run `batch` on a free instance; `done` is called once, on the loop, from a
        later callback (the instance's answer, a timeout, a failure), never from
        within submit."""
        refused = self.lost or (_closed() if self._closed else None)
        if refused is not None:
            asyncio.get_running_loop().call_soon(done, refused)
            return
        self._waiting.append(_Job(batch, done, time.monotonic()))
        self._pump()

    def _gpu_usable(self, instance: ModelInstance, now: float) -> bool:
        return not self._health.is_failed(instance.device) and self.breaker(instance).allows(now)

    def breaker(self, instance: ModelInstance) -> Breaker:
        breaker = self._breakers.get(id(instance))
        if breaker is None:
            breaker = self._breakers[id(instance)] = Breaker(*self._backoff)
        return breaker

    def _pick(self, now: float, cpu: bool, gpu: bool) -> ModelInstance | None:
        """A free instance: a healthy GPU one first (if `gpu`), else a CPU one (if `cpu`)."""
        chosen: ModelInstance | None = None
        for instance in self._free:
            if instance.on_gpu:
                if gpu and self._gpu_usable(instance, now):
                    chosen = instance
                    break
            elif cpu and chosen is None:
                chosen = instance
        if chosen is not None:
            self._free.remove(chosen)
        return chosen

    def _cpu_may_serve(self, now: float, enqueued: float) -> bool:
        """CPU instances of a model with GPU instances are its fallback: they take
        ordinary batches only while no GPU instance is healthy, or once a batch has
        waited longer than the spill bound (parameter cpu_spill_after_ms)."""
        gpus = [i for i in self.instances if i.on_gpu]
        if not gpus or not any(self._gpu_usable(i, now) for i in gpus):
            return True
        return self._spill_after is not None and now - enqueued >= self._spill_after

    def _pump(self) -> None:
        """Match waiting batches with usable free instances (device retries first)."""
        if self._closed:
            # The instance threads are stopping: what still waits would be queued behind
            # their stop and never run (a drain that timed out left it here).
            self._fail_waiting(_closed())
            return
        now = time.monotonic()
        while self._fallback:
            if self._fallback[0].answered:
                self._fallback.popleft()
                continue
            instance = self._pick(now, cpu=True, gpu=False)
            if instance is None:
                break
            self._start(instance, self._fallback.popleft())
        while self._waiting:
            job = self._waiting[0]
            if job.answered:
                self._waiting.popleft()
                continue
            cpu = self._cpu_may_serve(now, job.enqueued)
            instance = self._pick(now, cpu=cpu, gpu=True)
            if instance is None:
                if not cpu and self._spill_after is not None and self._spill_timer is None:
                    delay = max(0.0, job.enqueued + self._spill_after - now)
                    self._spill_timer = asyncio.get_running_loop().call_later(delay, self._spill)
                break
            self._waiting.popleft()
            if not instance.on_gpu and any(i.on_gpu for i in self.instances):
                self.spills += 1
            self._start(instance, job)

    def _spill(self) -> None:
        self._spill_timer = None
        self._pump()

    def _capacity_changed(self) -> None:
        self._pump()
        if self.on_change is not None:
            self.on_change()

    def _device_failed(self) -> None:
        """Some device failed for good (maybe in another model): lose the pool if
        nothing it has can serve any more."""
        self._check_alive()
        self._capacity_changed()

    def _check_alive(self) -> None:
        if self.lost is not None or self._closed or self._replacements:
            return
        if any(not self._health.is_failed(i.device) for i in self.instances):
            return
        if self.instances:
            devices = sorted({i.device for i in self.instances})
            reason = f"its devices failed ({', '.join(devices)})"
        else:
            reason = "no instance of the model is left"
        self.lost = Unavailable(f"model cannot be served: {reason}")
        log.error("instance pool lost: %s", reason)
        self._fail_waiting(self.lost)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def _fail_waiting(self, error: ConvoyError) -> None:
        # Answered in a later turn: this may run inside submit (the pool closed, from
        # its closing thread, between submit's check and the pump), and an answer may
        # lead the queue to submit again.
        jobs = [*self._waiting, *self._fallback]
        self._waiting.clear()
        self._fallback.clear()
        loop = asyncio.get_running_loop()
        for job in jobs:
            loop.call_soon(job.answer, error)

    def _start(self, instance: ModelInstance, job: _Job) -> None:
        run = _Run(instance, job, started_ns=time.monotonic_ns())
        if self._timeout is not None:
            loop = asyncio.get_running_loop()
            run.timer = loop.call_later(self._timeout, self._overran, run)
        instance.submit(job.batch, functools.partial(self._finished, run))

    def _finished(self, run: _Run, outcome: BatchOutcome | BaseException) -> None:
        run.returned = True
        if run.timer is not None:
            run.timer.cancel()
        instance, job = run.instance, run.job
        if self.on_busy is not None:
            self.on_busy(instance.device, time.monotonic_ns() - run.started_ns)
        if instance.retired:
            return  # the overrun already answered this batch
        # The instance is free again before the queue hears the answer, so the batch
        # the queue forms next finds it.
        self._free.append(instance)
        if isinstance(outcome, BaseException):
            if instance.on_gpu and is_device_fault(outcome):
                self._device_fault(instance, outcome, job)
            else:
                job.answer(outcome)
        else:
            if instance.on_gpu:
                self.breaker(instance).reset()
            job.answer(outcome)
        self._pump()

    def _device_fault(self, instance: ModelInstance, error: BaseException, job: _Job) -> None:
        if is_fatal_device_fault(error):
            self._health.mark_failed(instance.device, str(error))
        else:
            backoff = self.breaker(instance).trip(time.monotonic())
            log.error(
                "instance %s on %s: device fault (%s); out of service for %.1f s",
                instance.name,
                instance.device,
                error,
                backoff,
            )
            asyncio.get_running_loop().call_later(backoff, self._capacity_changed)
        if job.answered:
            return
        if any(not i.on_gpu for i in self.instances):
            self.fallbacks += 1
            self._fallback.append(job)
        else:
            job.answer(
                Unavailable(f"{instance.device} failed ({error}) and no CPU instance can take over")
            )

    def _overran(self, run: _Run) -> None:
        if run.returned:
            return
        instance = run.instance
        instance.retire()
        self.instances.remove(instance)
        log.error(
            "instance %s ran past the execution timeout of %.3f s: batch failed, instance retired",
            instance.name,
            self._timeout,
        )
        run.job.answer(
            Unavailable(
                f"instance {instance.name} exceeded the execution timeout of "
                f"{self._timeout:g} s; the instance is being replaced"
            )
        )
        if self._factory is not None and not self._closed:
            loop = asyncio.get_running_loop()
            building = loop.run_in_executor(None, self._factory, instance.device)
            self._replacements.add(building)
            building.add_done_callback(self._replaced)
        else:
            self._check_alive()

    def _replaced(self, building: asyncio.Future[ModelInstance]) -> None:
        self._replacements.discard(building)
        if building.cancelled() or building.exception() is not None:
            error = None if building.cancelled() else building.exception()
            log.error("building a replacement instance failed: %r", error)
            self._check_alive()
            return
        instance = building.result()
        if self._closed:
            instance.close()
            return
        self.replaced += 1
        self.instances.append(instance)
        log.info("replacement instance %s is serving", instance.name)
        self._free.append(instance)
        self._capacity_changed()

    def close(self, timeout_s: float | None = None) -> None:
        """Blocking: stops every instance's thread and waits for them, all within
        timeout_s; call it off the event loop."""
        self._closed = True
        self._health.unsubscribe(self._device_failed)
        for instance in self.instances:  # every thread told first: they stop together
            instance.stop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for instance in self.instances:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            instance.close(left)
