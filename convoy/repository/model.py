"""ServedModel: one loaded model version, its queue, instances and statistics."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from ..backends.base import ShapeRange, input_bounds
from ..batching.batch import Batch
from ..batching.queue import BatchOutcome, Clock, ModelQueue
from ..batching.request import InferRequest, InferResult
from ..config import DEFAULT_LIMITS, ModelSpec, ServingLimits
from ..errors import ConvoyError, InternalError
from ..metrics import ModelMetrics
from ..monitoring.registry import ModelMonitoring, Monitors
from ..pb import model_config_pb2 as mc
from ..scheduling.pool import InstancePool
from ..statistics import ModelStatistics
from ..tensors import Array

# (model, version, error or None, queue ns, compute ns): told of every request's outcome.
OutcomeSink = Callable[[str, str, ConvoyError | None, int, int], None]


class ModelVersion(Protocol):
    """What the frontend and the repository need of a loaded model version: a model
    with instances (ServedModel) or an ensemble of other models (EnsembleModel)."""

    spec: ModelSpec
    version: int
    version_label: str
    config: mc.ModelConfig
    labels: dict[str, list[str]]
    stats: ModelStatistics
    ready: bool
    monitoring: ModelMonitoring | None
    monitoring_handle: ModelMonitoring | None
    input_bounds: Mapping[str, ShapeRange]

    def start(self) -> None: ...

    async def close(self, drain: bool, timeout_s: float | None = None) -> None: ...

    def discard(self) -> None:
        """Blocking: release what was built for a version that never started."""
        ...

    async def infer(self, request: InferRequest) -> InferResult: ...

    def record_rejection(self, error: ConvoyError) -> None: ...

    def record_cached(self, total_ns: int) -> None:
        """A request answered from the response cache, without the queue."""
        ...


class ServedModel:
    """Owns its ModelQueue (started in start(), stopped in close()) and its pool."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        config: mc.ModelConfig,
        pool: InstancePool,
        metrics: ModelMetrics,
        clock: Clock,
        limits: ServingLimits = DEFAULT_LIMITS,
        outcomes: OutcomeSink | None = None,
    ) -> None:
        self.spec = spec
        self.version = version
        self.version_label = str(version)
        self._outcomes = outcomes
        self._monitors: Monitors | None = None
        self.monitoring_handle: ModelMonitoring | None = None
        self.monitoring: ModelMonitoring | None = None  # set only where it has work to do
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.stats = ModelStatistics(name=spec.name, version=str(version))
        self._clock = clock
        self.inflight = 0
        self.ready = True  # false once nothing can serve it (lost instances or devices)
        # What the runtime accepts per input (a TensorRT profile), checked at decode.
        self.input_bounds: Mapping[str, ShapeRange] = input_bounds(pool.instances[0].backend)
        self.labels: dict[str, list[str]] = {}  # output -> class labels (label_filename)
        self.queue = ModelQueue(
            name=f"{spec.name}:{version}",
            max_batch_size=spec.max_batch_size,
            batching=spec.batching,
            runner=pool,
            observer=self,
            clock=clock,
            slo_target_ns=spec.latency_slo_ns,
            default_max_queue_size=limits.max_queue_size,
            background_share=limits.background_compute_share,
        )
        # A background request may run in pieces (infer) where its outputs join back:
        # a batch dimension first and fixed dims past it.
        self._pieceable = spec.max_batch_size > 0 and all(-1 not in t.dims for t in spec.outputs)

    @property
    def devices(self) -> list[str]:
        return [instance.device for instance in self.pool.instances]

    def start(self) -> None:
        if self._monitors is not None and self.monitoring_handle is not None:
            # Only now: until this version serves, its predecessor's monitor is the one
            # to read (and stays so if this version's load fails).
            self._monitors.activate(self.monitoring_handle)
        self.queue.start()
        self.pool.on_change = self.queue.wake
        self.pool.on_lost = self._lost
        self.pool.on_busy = self.metrics.busy
        self.metrics.watch(lambda: self.queue.depth, lambda: self.inflight)
        self.metrics.read(self.stats)  # Prometheus's request series, read when scraped
        if self.queue.slo is not None:
            self.metrics.watch_slo(self.queue.slo)

    def _lost(self, error: ConvoyError) -> None:
        """Nothing can run this version any more: fail fast instead of queueing."""
        self.ready = False
        self.metrics.serving(False)
        self.queue.stop_accepting(error)

    async def close(self, drain: bool, timeout_s: float | None = None) -> None:
        """Stop serving, within timeout_s (the grace period) in all: the queue's drain,
        then the instances' threads with what is left of it, but at least a second
        (an idle thread needs a moment to see its stop)."""
        self.ready = False
        self.metrics.serving(False)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        await self.queue.close(drain, timeout_s)
        left = None if deadline is None else max(1.0, deadline - loop.time())
        await asyncio.to_thread(self.pool.close, left)
        self.metrics.release()
        if self._monitors is not None and self.monitoring_handle is not None:
            await asyncio.to_thread(self._monitors.detach, self.monitoring_handle)

    def discard(self) -> None:
        self.pool.close()

    def attach_monitoring(self, monitors: Monitors, monitoring: ModelMonitoring) -> None:
        self._monitors = monitors
        self.monitoring_handle = monitoring
        self.monitoring = monitoring if monitoring.active else None

    async def infer(self, request: InferRequest) -> InferResult:
        """Queue the request and wait for its one answer (a background request beside
        callers: in pieces). A caller's request passes the pieces at one attribute read:
        this runs for every request."""
        if request.background and not request.piece and self._pieceable:
            rows = self.queue.piece_rows(request)
            if rows:
                return await self._infer_in_pieces(request, rows)
        try:
            self.queue.submit(request)
        except ConvoyError as exc:
            if request.background:  # shed, not a failure of this version
                raise
            self.record_rejection(exc)
            raise
        self.inflight += 1
        try:
            return await request.future
        finally:
            self.inflight -= 1

    async def _infer_in_pieces(self, request: InferRequest, rows: int) -> InferResult:
        """A background request while callers are about, as pieces of `rows` rows run one
        after another (ModelQueue.piece_rows says why), joined into one answer and
        counted as one request. A drain waits for the last piece (ModelQueue.pieces)."""
        loop = asyncio.get_running_loop()
        request.arrival_ns = request.arrival_ns or self._clock()  # a shadow copy's is 0
        starts = range(0, request.rows, rows)
        results: list[InferResult] = []
        dispatched = 0
        with self.queue.pieces():
            try:
                for start in starts:
                    end = min(start + rows, request.rows)
                    piece = dataclasses.replace(
                        request,
                        inputs={name: value[start:end] for name, value in request.inputs.items()},
                        rows=end - start,
                        future=loop.create_future(),
                        piece=True,
                    )
                    results.append(await self.infer(piece))  # refused: shed, uncounted
                    dispatched = dispatched or piece.dispatch_ns
                sizes = [min(rows, request.rows - start) for start in starts]
                result = _joined(results, sizes)
            except ConvoyError as exc:
                if results or dispatched:  # refused at its first piece: shed, not counted
                    request.dispatch_ns = dispatched
                    self.on_request_done(request, exc, self._clock())
                raise
            except asyncio.CancelledError:
                request.dispatch_ns = dispatched
                self.on_request_done(request, self.queue.cancelled(), self._clock())
                raise
        request.dispatch_ns = dispatched
        self.on_request_done(request, None, self._clock())
        if not request.future.done():
            request.future.set_result(result)
        return result

    def record_cached(self, total_ns: int) -> None:
        """A success, as Triton counts cache hits; inference_count is left alone."""
        self.stats.record_request(True, total_ns, None)

    def record_rejection(self, error: ConvoyError) -> None:
        """A request refused before it was queued (bad input, full queue)."""
        self.stats.record_request(False, 0, None, type(error).__name__)
        if self._outcomes is not None:
            self._outcomes(self.spec.name, self.version_label, error, 0, 0)

    # -- QueueObserver -------------------------------------------------------

    def on_batch(self, batch: Batch, outcome: BatchOutcome, output_ns: int) -> None:
        self.stats.record_batch(
            batch.rows,
            len(batch.requests),
            outcome.input_ns,
            outcome.infer_ns,
            output_ns,
            outcome.device,
        )

    def on_request_done(
        self, request: InferRequest, error: ConvoyError | None, now_ns: int
    ) -> None:
        if request.piece:  # counted once, as the whole request (_infer_in_pieces)
            return
        total = now_ns - request.arrival_ns
        queued = request.dispatch_ns - request.arrival_ns if request.dispatch_ns else None
        reason = None if error is None else type(error).__name__
        self.stats.record_request(error is None, total, queued, reason)
        if self._outcomes is not None:
            compute = now_ns - request.dispatch_ns if request.dispatch_ns else 0
            # A background run waits behind every caller by design: its queue time says
            # nothing about this version, its compute time and errors do.
            waited = 0 if request.background else queued or 0
            self._outcomes(self.spec.name, self.version_label, error, waited, compute)


def _joined(results: Sequence[InferResult], rows: Sequence[int]) -> InferResult:
    """The pieces' answers, in order, as one; InternalError where a piece's tensor does
    not have the piece's rows first (an output the backend did not batch)."""

    def join(parts: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
        for part, count in zip(parts, rows, strict=True):
            for name, value in part.items():
                if value.ndim == 0 or value.shape[0] != count:
                    raise InternalError(
                        f"output '{name}' of a piece of {count} rows has shape "
                        f"{list(value.shape)}; expected a batch dimension of {count}"
                    )
        try:
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        except ValueError as exc:  # dims past the batch dimension differ between pieces
            raise InternalError(f"the pieces' outputs do not join: {exc}") from None

    added = [r.added_inputs for r in results]
    return InferResult(join([r.outputs for r in results]), {}, join(added) if added[0] else {})
