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
Queue and batch spans are written once their end is known, from the monotonic
timestamps the queue already keeps, so tracing adds no work to the queue's hot loop.
Spans leave through a BatchSpanProcessor: exported on its own thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
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
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

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
TRANSPORT = "convoy.transport"  # grpc | http (| replay, batch): the door
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
    """A sampled request's span (or an ensemble step's, or a shadow copy's), as the path
    and the queue hold it: on the Caller, then on the InferRequest the queue batches."""

    __slots__ = ("request", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.request: InferRequest | None = None  # once routed and decoded

    def routed(self, model: ModelVersion) -> None:
        """The version that answers (or refused) the request."""
        self.span.set_attributes({MODEL: model.spec.name, VERSION: model.version_label})

    def serves(self, model: ModelVersion, request: InferRequest) -> None:
        """The path routed and decoded the request: its batch will link to this span."""
        self.span.set_attributes(
            {MODEL: model.spec.name, VERSION: model.version_label, ROWS: request.rows}
        )
        self.request = request
        request.trace = self


class Tracing:
    """The server's tracer: owns the OpenTelemetry TracerProvider (and the exporter's
    thread), made with the server and shut down, flushed, at its stop."""

    def __init__(
        self,
        provider: TracerProvider,
        sample_rate: float,
        status_name: StatusName,
        rng: Callable[[], float] | None = None,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context

        self._trace = trace
        self._empty = Context()  # a batch span's: a trace of its own
        self._provider = provider
        self._tracer: Tracer = provider.get_tracer("convoy")
        self.sample_rate = sample_rate
        self._status_name = status_name
        self._random = rng or random.Random().random
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
        context = None
        if caller.traceparent is not None:
            parent = parse_traceparent(caller.traceparent)
            if parent is not None:
                if not parent.sampled:  # the caller decided: not recorded
                    return None
                context = self._remote(parent)
        if context is None:
            rate = self.sample_rate
            if rate <= 0.0 or (rate < 1.0 and self._random() >= rate):
                return None
            context = self._empty
        attributes: dict[str, Any] = {MODEL: request.model_name, TRANSPORT: caller.transport}
        if request.model_version:
            attributes[VERSION] = request.model_version
        if request.id:
            attributes[REQUEST_ID] = request.id
        span = self._tracer.start_span(
            f"infer {request.model_name}",
            context=context,
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=self._now(),
        )
        return RequestSpan(span)

    def _remote(self, parent: Parent) -> Any:
        trace = self._trace
        context = trace.SpanContext(
            parent.trace_id, parent.span_id, is_remote=True, trace_flags=trace.TraceFlags(1)
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(context), self._empty)

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
        context = self._trace.set_span_in_context(parent.span, self._empty)
        span = self._tracer.start_span(
            name, context=context, attributes={MODEL: model}, start_time=self._now()
        )
        return RequestSpan(span)

    # -- the end of a span, and its queue wait -----------------------------------------------

    def _end(self, handle: RequestSpan, error: BaseException | None) -> None:
        span = handle.span
        request = handle.request
        code = self._code(error)
        end_ns = self._wall(time.monotonic_ns())
        handle.request = None  # the request holds its span, not the other way: no cycle
        try:
            if request is not None and request.settled:  # it went through a model's queue
                self._queue_span(handle, request, code, end_ns)
            self._status(span, code, error)
        finally:
            span.end(end_time=end_ns)

    def _queue_span(self, handle: RequestSpan, request: InferRequest, code: str, end: int) -> None:
        """arrival to dispatch (or to the answer, for one that never left the queue)."""
        left = self._wall(request.dispatch_ns) if request.dispatch_ns else end
        context = self._trace.set_span_in_context(handle.span, self._empty)
        queue = self._tracer.start_span(
            "queue",
            context=context,
            start_time=self._wall(request.arrival_ns),
            attributes={PRIORITY: request.queue_level + 1},
        )
        if not request.dispatch_ns:  # answered in the queue: its status is the request's
            self._status(queue, code, None)
        queue.end(end_time=left)

    def _code(self, error: BaseException | None) -> str:
        if error is None:
            return "OK"
        if isinstance(error, ConvoyError):
            return self._status_name(error)
        if isinstance(error, asyncio.CancelledError):
            return self._status_name(Cancelled("cancelled"))
        return self._status_name(InternalError(repr(error)))

    def _status(self, span: Span, code: str, error: BaseException | None) -> None:
        span.set_attributes({STATUS: code, RPC_STATUS: _CODES.get(code, _CODES["UNKNOWN"])})
        if code in _SERVER_FAULTS:
            message = error.message if isinstance(error, ConvoyError) else code
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message))

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
        trace = self._trace
        links = [trace.Link(t.span.get_span_context()) for t in traced]
        attributes: dict[str, Any] = {
            MODEL: model,
            VERSION: version,
            BATCH_SIZE: batch.rows,
            BATCH_REQUESTS: len(batch.requests),
        }
        if isinstance(outcome, BatchOutcome):
            attributes[DEVICE] = outcome.device
        span = self._tracer.start_span(
            f"batch {model}",
            context=self._empty,
            links=links,
            start_time=self._wall(batch.requests[0].dispatch_ns),
            attributes=attributes,
        )
        error = outcome if isinstance(outcome, BaseException) else None
        self._status(span, self._code(error), error)
        span.end(end_time=self._wall(end_ns))
        context = span.get_span_context()
        for handle in traced:  # from the request's side too: its trace shows its batch
            # (not where the request was answered first: a batch failed by an unload)
            if handle.span.is_recording():
                handle.span.set_attribute(BATCH_SIZE, batch.rows)
                handle.span.add_link(context)

    def close(self) -> None:
        """Blocking: export what is buffered (within the exporter's timeout, retries
        included, where the collector is down), then stop the exporter's thread."""
        self._provider.shutdown()


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
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    except ImportError as exc:
        raise ConfigError(
            "--trace-endpoint",
            "tracing",
            f"needs OpenTelemetry's SDK and OTLP exporter: pip install 'convoy[{EXTRA}]' ({exc})",
        ) from None
    from .. import __version__

    # Sampling is decided before a span exists (Tracing._begin): the SDK records all.
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        # Named by OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES where the operator did.
        resource = resource.merge(Resource({"service.name": "convoy"}))
    provider = TracerProvider(sampler=ALWAYS_ON, resource=resource)
    # An export gives up after EXPORT_TIMEOUT_S, retries included: it bounds the server's
    # stop where the collector is down (the SDK's default is 10 s).
    exporter = OTLPSpanExporter(endpoint=config.endpoint, insecure=True, timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, config.sample_rate, status_name)
