"""OpenTelemetry traces of the inference path, exported over OTLP/gRPC (docs/tracing.md).

Off unless `--trace-endpoint` is given: then, and only then, the OpenTelemetry SDK is
imported (the `otel` extra). A request is sampled at its door's entry to the path: a
W3C `traceparent` that the caller sent decides (sampled: continued; not sampled: not
recorded); without one, `--trace-sample-rate` does. Only sampled requests touch the
SDK: the decision is a header lookup and one random number, taken before any span
object exists, so at 1 % the other 99 requests pay well under a microsecond.

A sampled request's spans: the request (SERVER) with its queue wait as a child; every
executed batch holding a sampled request gets one span of its own trace, linked to each
sampled request in it (and each request links back to it: a batch belongs to no one
trace); ensemble steps and shadow copies are children of the request that caused them.
Every span is written once, when its end is known, as a finished span (queue and batch
spans from the monotonic timestamps the queue already keeps: no work in the queue's hot
loop), and leaves through a BatchSpanProcessor: exported on its own thread, off the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..batching.batch import Batch
from ..batching.queue import BatchOutcome
from ..batching.request import InferRequest, InferResult
from ..config import TracingConfig
from ..errors import Cancelled, ConfigError, ConvoyError, InternalError
from ..pb import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace import Link, SpanContext, SpanKind

    from ..repository.model import ModelVersion
    from .caller import Caller
    from .path import BuildRequest

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the W3C Trace Context header (gRPC metadata or HTTP)
EXTRA = "otel"  # pip install 'convoy[otel]'
EXPORT_TIMEOUT_S = 5.0

# Attribute names (docs/tracing.md). OpenTelemetry's RPC conventions where one fits;
# Convoy's own under `convoy.`, in the same lower-case dotted style.
MODEL = "convoy.model.name"
VERSION = "convoy.model.version"
TRANSPORT = "convoy.transport"  # the door: grpc | http | batch | replay
REQUEST_ID = "convoy.request.id"
ROWS = "convoy.request.rows"  # the request's own batch size
BATCH_SIZE = "convoy.batch.size"  # rows in the executed batch
BATCH_REQUESTS = "convoy.batch.requests"  # requests in the executed batch
DEVICE = "convoy.batch.device"
PRIORITY = "convoy.queue.priority"
STATUS = "convoy.status_code"  # the gRPC status code's name: OK, UNAVAILABLE, ...
RPC_STATUS = "rpc.grpc.status_code"  # the same, as OpenTelemetry's RPC conventions number it

# gRPC's status codes by name (the protocol's numbers: the path imports no grpc).
_CODES = {
    name: number
    for number, name in enumerate(
        "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS "
        "PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE "
        "UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED".split()
    )
}
# The server's own failures, as OpenTelemetry's gRPC conventions set a server span's
# status; a client's mistake (INVALID_ARGUMENT, NOT_FOUND, ...) leaves it unset.
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

# version-traceid-parentid-flags; a later version may append fields after a '-'.
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")

StatusName = Callable[[ConvoyError], str]  # a Convoy error -> its gRPC status code's name


def parse_endpoint(text: str) -> str:
    """HOST:PORT (a bracketed IPv6 host too), else ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or " " in text:
        raise ValueError(f"'{text}' is not HOST:PORT (an OTLP/gRPC collector, e.g. localhost:4317)")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"'{text}': an IPv6 host is written [ADDRESS]:PORT")
    elif ":" in host:
        raise ValueError(f"'{text}': an IPv6 host is written [ADDRESS]:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{text}': the port must be a number from 1 to 65535")
    return text


def parse_sample_rate(text: str) -> float:
    """A fraction from 0 to 1, else ValueError."""
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number") from None
    if not 0.0 <= rate <= 1.0:  # NaN too
        raise ValueError(f"'{text}' must be from 0 to 1 (a fraction of requests)")
    return rate


@dataclass(frozen=True, slots=True)
class Parent:
    """A caller's span, read from its traceparent."""

    trace_id: int
    span_id: int
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse_traceparent(value: str) -> Parent | None:
    """The caller's span, or None where the header is malformed: W3C Trace Context then
    starts a new trace, as if none had been sent."""
    match = _TRACEPARENT_RE.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace, span = int(trace_id, 16), int(span_id, 16)
    if not trace or not span:
        return None
    return Parent(trace, span, int(flags, 16))


class RequestSpan:
    """A sampled request's span (or an ensemble step's, or a shadow copy's) while it is
    open, as the path and the queue hold it: on the Caller, then on the InferRequest the
    queue batches. Plain data: it becomes OpenTelemetry's span object when it ends."""

    __slots__ = (
        "attributes",
        "context",
        "ended",
        "kind",
        "links",
        "name",
        "parent",
        "request",
        "start_ns",
    )

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start_ns: int,
    ) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.start_ns = start_ns  # wall clock, the spans' time
        self.links: list[Link] = []
        self.ended = False
        self.request: InferRequest | None = None  # once routed and decoded

    def routed(self, model: ModelVersion) -> None:
        """The version that answers (or refused) the request."""
        self.attributes[MODEL] = model.spec.name
        self.attributes[VERSION] = model.version_label

    def serves(self, model: ModelVersion, request: InferRequest) -> None:
        """The path routed and decoded the request: its batch will link to this span."""
        self.routed(model)
        self.attributes[ROWS] = request.rows
        self.request = request
        request.trace = self


class Tracing:
    """The server's tracer: owns the span processor (and its exporter's thread), made with
    the server and shut down, flushed, at its stop.

    Spans are built as OpenTelemetry's finished `ReadableSpan`s and handed to the
    processor, not made through its Tracer: its live spans (locks, attribute limits,
    a sampler per span) cost about 15 µs each on the loop here against about 4 µs, and
    every span of ours is written once, with times the queue already took (docs/tracing.md)."""

    def __init__(
        self,
        processor: SpanProcessor,
        resource: Resource,
        sample_rate: float,
        status_name: StatusName,
        rng: Callable[[], float] | None = None,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from .. import __version__

        self._trace = trace
        self._readable = ReadableSpan
        self._sampled = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        self._processor = processor
        self._resource = resource
        self._scope = InstrumentationScope("convoy", __version__)
        self.sample_rate = sample_rate
        self._status_name = status_name
        ids = random.Random()  # seeded from the OS: ids unique across restarts
        self._random = rng or ids.random
        self._bits = ids.getrandbits
        # Every span's times are the queue's monotonic clock, shifted to the wall clock by
        # one offset, so a request's queue wait and batch fall inside its span to the
        # nanosecond; the offset follows the wall clock only when it steps (NTP).
        self._offset = time.time_ns() - time.monotonic_ns()

    def _wall(self, monotonic_ns: int) -> int:
        return monotonic_ns + self._offset

    def _now(self) -> int:
        """Wall-clock now, in the spans' time."""
        offset = time.time_ns() - time.monotonic_ns()
        if abs(offset - self._offset) > 1_000_000:  # the wall clock stepped
            self._offset = offset
        return time.monotonic_ns() + self._offset

    def _context(self, trace_id: int | None = None) -> SpanContext:
        """A new span's ids: in trace_id, else in a new trace (ids are never 0)."""
        return self._trace.SpanContext(
            trace_id or self._bits(128) or 1,
            self._bits(64) or 1,
            is_remote=False,
            trace_flags=self._sampled,
        )

    # -- the doors' requests ---------------------------------------------------------------

    async def request(
        self,
        infer: Callable[[pb.ModelInferRequest, Caller], Awaitable[pb.ModelInferResponse]],
        request: pb.ModelInferRequest,
        caller: Caller,
    ) -> pb.ModelInferResponse:
        """`infer` (the path's), in a span when this request is sampled."""
        span = self._begin(caller, request)
        if span is None:
            return await infer(request, caller)
        caller.span = span
        try:
            response = await infer(request, caller)
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span, None)
        return response

    def _begin(self, caller: Caller, request: pb.ModelInferRequest) -> RequestSpan | None:
        parent = None
        if caller.traceparent is not None:
            remote = parse_traceparent(caller.traceparent)
            if remote is not None:
                if not remote.sampled:  # the caller decided: not recorded
                    return None
                parent = self._trace.SpanContext(
                    remote.trace_id, remote.span_id, is_remote=True, trace_flags=self._sampled
                )
        if parent is None:
            rate = self.sample_rate
            if rate <= 0.0 or (rate < 1.0 and self._random() >= rate):
                return None
        attributes: dict[str, Any] = {MODEL: request.model_name, TRANSPORT: caller.transport}
        if request.model_version:
            attributes[VERSION] = request.model_version
        if request.id:
            attributes[REQUEST_ID] = request.id
        return RequestSpan(
            f"infer {request.model_name}",
            self._context(parent.trace_id if parent is not None else None),
            parent,
            self._trace.SpanKind.SERVER,
            attributes,
            self._now(),
        )

    # -- the server's own work under a request: ensemble steps, shadow copies ----------------

    async def step(
        self,
        run: Callable[[str, str, BuildRequest, Caller], Awaitable[InferResult]],
        name: str,
        version: str,
        build: BuildRequest,
        caller: Caller,
        parent: object,
    ) -> InferResult:
        """An ensemble's step, as a child of the ensemble request's span (`parent`: the
        ensemble request's InferRequest.trace)."""
        assert isinstance(parent, RequestSpan)
        span = self._child(parent, f"step {name}", name)
        caller.span = span
        try:
            result = await run(name, version, build, caller)
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span, None)
        return result

    async def shadow(
        self, model: ModelVersion, parent: object, mirrored: InferRequest
    ) -> InferResult:
        """A request's copy run on the other version, as a child of the request's span
        (which has usually ended by then: the copy runs after the answer)."""
        assert isinstance(parent, RequestSpan)
        span = self._child(parent, f"shadow {model.spec.name}", model.spec.name)
        span.serves(model, mirrored)
        try:
            result = await model.infer(mirrored)
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span, None)
        return result

    def _child(self, parent: RequestSpan, name: str, model: str) -> RequestSpan:
        return RequestSpan(
            name,
            self._context(parent.context.trace_id),
            parent.context,
            self._trace.SpanKind.INTERNAL,
            {MODEL: model},
            self._now(),
        )

    # -- the end of a span, and its queue wait -----------------------------------------------

    def _end(self, span: RequestSpan, error: BaseException | None) -> None:
        request = span.request
        code = self._code(error)
        end_ns = self._wall(time.monotonic_ns())
        span.request = None  # the request holds its span, not the other way: no cycle
        span.ended = True
        if request is not None and request.settled:  # it went through a model's queue
            self._queue_span(span, request, code, end_ns)
        self._emit(
            span.name,
            span.context,
            span.parent,
            span.kind,
            span.attributes,
            span.links,
            span.start_ns,
            end_ns,
            code,
            error,
        )

    def _queue_span(self, span: RequestSpan, request: InferRequest, code: str, end: int) -> None:
        """arrival to dispatch (or to the answer, for one that never left the queue)."""
        left = self._wall(request.dispatch_ns) if request.dispatch_ns else end
        self._emit(
            "queue",
            self._context(span.context.trace_id),
            span.context,
            self._trace.SpanKind.INTERNAL,
            {PRIORITY: request.queue_level + 1},
            (),
            self._wall(request.arrival_ns),
            left,
            None if request.dispatch_ns else code,  # answered in the queue: the request's
            None,
        )

    def _emit(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
        start_ns: int,
        end_ns: int,
        code: str | None,
        error: BaseException | None,
    ) -> None:
        """One finished span to the processor (the exporter's queue)."""
        trace = self._trace
        status = trace.Status(trace.StatusCode.UNSET)
        if code is not None:
            attributes[STATUS] = code
            attributes[RPC_STATUS] = _CODES.get(code, _CODES["UNKNOWN"])
            if code in _SERVER_FAULTS:
                message = error.message if isinstance(error, ConvoyError) else code
                status = trace.Status(trace.StatusCode.ERROR, message)
        self._processor.on_end(
            self._readable(
                name,
                context=context,
                parent=parent,
                resource=self._resource,
                attributes=attributes,
                links=links,
                kind=kind,
                status=status,
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=self._scope,
            )
        )

    def _code(self, error: BaseException | None) -> str:
        if error is None:
            return "OK"
        if isinstance(error, ConvoyError):
            return self._status_name(error)
        if isinstance(error, asyncio.CancelledError):
            return self._status_name(Cancelled("cancelled"))
        return self._status_name(InternalError(repr(error)))

    # -- batches ---------------------------------------------------------------------------

    def batches(self, model: str, version: str) -> BatchSpans:
        """The span writer of one model version's queue (ModelQueue.tracer)."""
        return BatchSpans(self, model, version)

    def batch_span(
        self,
        model: str,
        version: str,
        batch: Batch,
        traced: Sequence[RequestSpan],
        outcome: BatchOutcome | BaseException,
        end_ns: int,
    ) -> None:
        link = self._trace.Link
        attributes: dict[str, Any] = {
            MODEL: model,
            VERSION: version,
            BATCH_SIZE: batch.rows,
            BATCH_REQUESTS: len(batch.requests),
        }
        if isinstance(outcome, BatchOutcome):
            attributes[DEVICE] = outcome.device
        error = outcome if isinstance(outcome, BaseException) else None
        context = self._context()  # a trace of its own
        self._emit(
            f"batch {model}",
            context,
            None,
            self._trace.SpanKind.INTERNAL,
            attributes,
            [link(t.context) for t in traced],
            self._wall(batch.requests[0].dispatch_ns),
            self._wall(end_ns),
            self._code(error),
            error,
        )
        for span in traced:  # from the request's side too: its trace shows its batch
            # (not where the request was answered first: a batch failed by an unload)
            if not span.ended:
                span.attributes[BATCH_SIZE] = batch.rows
                span.links.append(link(context))

    def close(self, timeout_s: float) -> bool:
        """Blocking, at most `timeout_s`: export what is buffered, then stop the exporter's
        thread. The SDK's shutdown takes no timeout (30 s, retries included, where the
        collector is down), so it runs on a daemon thread that a stop does not wait past
        its grace period for. False: gave up, the remaining spans dropped."""
        worker = threading.Thread(
            target=self._processor.shutdown, name="convoy-tracing-close", daemon=True
        )
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("tracing: spans not exported within %.1f s are dropped", timeout_s)
            return False
        return True


class BatchSpans:
    """One model version's batches, written by its queue once each has run."""

    __slots__ = ("_model", "_tracing", "_version")

    def __init__(self, tracing: Tracing, model: str, version: str) -> None:
        self._tracing = tracing
        self._model = model
        self._version = version

    def batch_done(self, batch: Batch, outcome: BatchOutcome | BaseException, end_ns: int) -> None:
        """A span for the batch if it holds a sampled request (most do not)."""
        traced = [r.trace for r in batch.requests if isinstance(r.trace, RequestSpan)]
        if not traced:
            return
        try:
            self._tracing.batch_span(self._model, self._version, batch, traced, outcome, end_ns)
        except Exception:  # a trace must never cost the batch its answers
            log.exception("tracing a batch of model '%s' failed", self._model)


def open_tracing(config: TracingConfig, status_name: StatusName) -> Tracing:
    """The SDK with an OTLP/gRPC exporter to config.endpoint. ConfigError naming the
    flag and the extra where OpenTelemetry is not installed."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            "--trace-endpoint",
            "tracing",
            f"needs OpenTelemetry's SDK and OTLP exporter: pip install 'convoy[{EXTRA}]' ({exc})",
        ) from None
    from .. import __version__

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        # Named by OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES where the operator did.
        resource = resource.merge(Resource({"service.name": "convoy"}))
    # An export gives up after EXPORT_TIMEOUT_S, retries included: it bounds the server's
    # stop where the collector is down (the SDK's default is 10 s).
    exporter = OTLPSpanExporter(endpoint=config.endpoint, insecure=True, timeout=EXPORT_TIMEOUT_S)
    return Tracing(BatchSpanProcessor(exporter), resource, config.sample_rate, status_name)
