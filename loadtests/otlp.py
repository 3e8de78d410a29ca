"""A real OTLP/gRPC trace receiver on a local port: opentelemetry-proto's TraceService.

What `--trace-endpoint` sends to, for the tracing tests (which read the spans it keeps)
and the tracing benchmark (which only counts them). Not a collector: it keeps spans in
memory and answers every export with success.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as service_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Span:
    """One received span, its ids as hex as W3C writes them."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    kind: int  # trace_pb2.Span.SpanKind
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    status: int  # trace_pb2.Status.StatusCode
    start_ns: int
    end_ns: int
    service: str = ""

    @classmethod
    def of(cls, span: trace_pb2.Span, service: str) -> Span:
        return cls(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex(),
            kind=span.kind,
            attributes={a.key: value_of(a.value) for a in span.attributes},
            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
            status=span.status.code,
            start_ns=span.start_time_unix_nano,
            end_ns=span.end_time_unix_nano,
            service=service,
        )


@dataclass
class Receiver(service_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Keeps every span it is sent (`keep=False`: counts them only)."""

    keep: bool = True
    port: int = 0
    exports: int = 0
    count: int = 0
    _spans: list[Span] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def Export(
        self, request: service.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> service.ExportTraceServiceResponse:
        received = []
        for resource in request.resource_spans:
            name = next(
                (
                    value_of(a.value)
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                received += [Span.of(s, name) for s in scope.spans]
        with self._changed:
            self.exports += 1
            self.count += len(received)
            if self.keep:
                self._spans += received
            self._changed.notify_all()
        return service.ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spans(self) -> list[Span]:
        with self._changed:
            return list(self._spans)

    def wait_for(self, found: Callable[[list[Span]], bool], timeout_s: float = 20.0) -> list[Span]:
        """The spans once `found` holds of them; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not found(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"not received within {timeout_s} s; got {[s.name for s in self._spans]}"
                    )
                self._changed.wait(left)
            return list(self._spans)


@contextmanager
def otlp_receiver(keep: bool = True) -> Iterator[Receiver]:
    """A receiver listening on a free port of 127.0.0.1 while the block runs."""
    receiver = Receiver(keep=keep)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(0)
