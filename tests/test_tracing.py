"""Tracing's pieces without a server: the flags, the traceparent, the sampling decision,
the front ends' wire header, and the missing-extra refusal (docs/tracing.md)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from convoy.cli import main
from convoy.config import TracingConfig
from convoy.errors import ConfigError, ConvoyError
from convoy.inference.caller import Caller
from convoy.inference.tracing import (
    Parent,
    Tracing,
    open_tracing,
    parse_endpoint,
    parse_sample_rate,
    parse_traceparent,
)
from convoy.workers.wire import TRACED, decode_header, encode_header

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def test_a_traceparent_is_read_as_w3c_writes_it() -> None:
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01") == Parent(int(TRACE, 16), int(SPAN, 16), 1)
    assert not parse_traceparent(f"00-{TRACE}-{SPAN}-00").sampled  # type: ignore[union-attr]
    # a later version may append fields; version 00 may not
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-extra") is not None
    for bad in (
        f"00-{TRACE}-{SPAN}-01-extra",
        f"ff-{TRACE}-{SPAN}-01",  # the forbidden version
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero ids are invalid
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{SPAN}-01",  # lower-case hex only
        f"00-{TRACE}-{SPAN}",
        "",
    ):
        assert parse_traceparent(bad) is None, bad


@pytest.mark.parametrize(
    "endpoint", ["localhost:4317", "10.0.0.2:55680", "[::1]:4317", "collector.svc:1"]
)
def test_good_endpoints(endpoint: str) -> None:
    assert parse_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    ["localhost", "http://localhost:4317", ":4317", "localhost:0", "localhost:70000", "::1:4317"],
)
def test_bad_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match=endpoint.replace("[", r"\[")):
        parse_endpoint(endpoint)


def test_sample_rates_are_fractions() -> None:
    assert parse_sample_rate("0") == 0.0 and parse_sample_rate("0.01") == 0.01
    assert parse_sample_rate("1") == 1.0
    for bad in ("-0.1", "1.5", "nan", "often"):
        with pytest.raises(ValueError):
            parse_sample_rate(bad)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (
            ["--trace-endpoint", "localhost:4317", "--trace-sample-rate", "1.5"],
            "--trace-sample-rate",
        ),
        (
            ["--trace-endpoint", "localhost:4317", "--trace-sample-rate", "-1"],
            "--trace-sample-rate",
        ),
        (["--trace-endpoint", "localhost"], "--trace-endpoint"),
        (["--trace-endpoint", "grpc://localhost:4317"], "--trace-endpoint"),
        (["--trace-sample-rate", "0.5"], "--trace-sample-rate needs --trace-endpoint"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["serve", *argv])
    except SystemExit as exc:  # argparse's usage error
        code = int(exc.code or 0)
    assert code == 2
    assert flag in capsys.readouterr().err


def test_without_the_extra_the_server_refuses_to_start_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"--trace-endpoint.*convoy\[otel\]"):
        open_tracing(TracingConfig("localhost:4317", 0.1), lambda e: "INTERNAL")


def test_the_front_ends_header_carries_the_traceparent() -> None:
    traceparent = f"00-{TRACE}-{SPAN}-01"
    head = decode_header(encode_header(1.5, "user-7", 2, client="alice", traceparent=traceparent))
    assert head.traceparent == traceparent and head.flags & TRACED
    assert (head.ab_key, head.client, head.time_remaining, head.flags & 3) == (
        "user-7",
        "alice",
        1.5,
        2,
    )
    plain = decode_header(encode_header(None, "user-7", client="alice"))
    assert plain.traceparent is None and plain.ab_key == "user-7" and not plain.flags & TRACED
    with pytest.raises(ValueError, match="traceparent"):
        decode_header(encode_header(None, None, traceparent=traceparent)[:-10])


# -- the sampling decision, with the SDK's in-memory exporter ----------------------------


class Request:
    """What the decision reads of a ModelInferRequest."""

    model_name = "m"
    model_version = ""
    id = ""


def traced(rate: float, draws: list[float]) -> tuple[Tracing, Any]:
    pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is missing")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    resource = Resource.create({})
    rolls = iter(draws)
    tracing = Tracing(
        SimpleSpanProcessor(exporter),
        resource,
        rate,
        lambda e: "NOT_FOUND",
        rng=lambda: next(rolls),
    )
    return tracing, exporter


def serve(tracing: Tracing, traceparent: str | None = None, fail: bool = False) -> None:
    async def infer(request: Any, caller: Caller) -> str:
        if fail:
            raise ConvoyError("no such model")
        return "answer"

    caller = Caller("grpc", traceparent=traceparent)
    try:
        asyncio.run(tracing.request(infer, Request(), caller))  # type: ignore[arg-type]
    except ConvoyError:
        pass


def test_requests_without_a_traceparent_are_sampled_at_the_rate() -> None:
    tracing, exporter = traced(0.25, [0.5, 0.1, 0.25, 0.0, 0.9])
    for _ in range(5):
        serve(tracing)
    assert len(exporter.get_finished_spans()) == 2  # the draws below 0.25


def test_the_callers_decision_wins_over_the_rate() -> None:
    tracing, exporter = traced(1.0, [])  # a draw would raise StopIteration
    serve(tracing, f"00-{TRACE}-{SPAN}-00")
    assert exporter.get_finished_spans() == ()
    zero, exporter = traced(0.0, [])
    serve(zero, f"00-{TRACE}-{SPAN}-01", fail=True)
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == int(TRACE, 16) and span.parent.span_id == int(SPAN, 16)
    assert span.attributes["convoy.status_code"] == "NOT_FOUND"
    # a malformed traceparent starts a trace of its own, at the rate
    serve(zero, "00-nonsense")
    assert len(exporter.get_finished_spans()) == 1


def test_a_failed_batch_is_an_error_linked_to_its_sampled_requests_only() -> None:
    from opentelemetry.trace import StatusCode

    from convoy.api.status import status_code
    from convoy.batching.batch import Batch
    from convoy.batching.request import InferRequest
    from convoy.errors import Unavailable

    tracing, exporter = traced(1.0, [])
    tracing._status_name = lambda error: status_code(error).name
    loop = asyncio.new_event_loop()
    try:
        requests = [
            InferRequest(str(i), {}, (), 1, (), loop.create_future(), dispatch_ns=5)
            for i in range(3)
        ]
    finally:
        loop.close()
    model: Any = SimpleNamespace(spec=SimpleNamespace(name="m"), version_label="3")
    spans = []
    for request in requests[:2]:  # the third was not sampled
        caller = Caller("grpc")
        span = tracing._begin(caller, Request())  # type: ignore[arg-type]
        assert span is not None
        span.serves(model, request)
        spans.append(span)
    failure = Unavailable("the instance died")
    tracing.batches("m", "3").batch_done(Batch(tuple(requests), True), failure, 10)
    (batch,) = exporter.get_finished_spans()
    assert batch.name == "batch m" and batch.status.status_code is StatusCode.ERROR
    assert batch.status.description == "the instance died"
    assert batch.attributes["convoy.status_code"] == "UNAVAILABLE"
    assert batch.attributes["convoy.batch.requests"] == 3
    assert [link.context.span_id for link in batch.links] == [s.context.span_id for s in spans]
    for span in spans:  # and each request links back to its batch, when it ends
        assert [link.context.span_id for link in span.links] == [batch.context.span_id]
        tracing._end(span, None)
    ended = exporter.get_finished_spans()[1:]
    assert [s.links[0].context.span_id for s in ended] == [batch.context.span_id] * 2
    assert [s.attributes["convoy.batch.size"] for s in ended] == [3, 3]


def test_a_request_that_timed_out_in_the_queue_is_the_servers_fault() -> None:
    from opentelemetry.trace import StatusCode

    from convoy.api.status import status_code
    from convoy.batching.request import InferRequest
    from convoy.errors import DeadlineExceeded

    tracing, exporter = traced(1.0, [])
    tracing._status_name = lambda error: status_code(error).name
    model: Any = SimpleNamespace(spec=SimpleNamespace(name="m"), version_label="1")

    async def infer(request: Any, caller: Caller) -> str:
        assert caller.span is not None
        queued = InferRequest(
            "q", {}, (), 1, (), asyncio.get_running_loop().create_future(), arrival_ns=1
        )
        caller.span.serves(model, queued)
        queued.arrival_ns, queued.settled = time.monotonic_ns(), True  # never dispatched
        raise DeadlineExceeded("model 'm': request timed out in the queue after 5.0 ms")

    with pytest.raises(DeadlineExceeded):
        asyncio.run(tracing.request(infer, Request(), Caller("grpc")))  # type: ignore[arg-type]
    queue, request = exporter.get_finished_spans()
    assert request.status.status_code is StatusCode.ERROR
    assert "timed out in the queue" in (request.status.description or "")
    assert request.attributes["convoy.status_code"] == "DEADLINE_EXCEEDED"
    assert request.attributes["rpc.grpc.status_code"] == 4
    assert queue.parent.span_id == request.context.span_id
    assert queue.attributes["convoy.status_code"] == "DEADLINE_EXCEEDED"
    assert queue.end_time == request.end_time  # it waited until answered


class Stuck:
    """A span processor whose shutdown waits for a collector that never answers."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def shutdown(self) -> None:
        self.entered.set()
        self.release.wait()


def test_close_gives_up_at_its_timeout_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is missing")
    from opentelemetry.sdk.resources import Resource

    stuck = Stuck()
    tracing = Tracing(stuck, Resource.create({}), 1.0, lambda e: "NOT_FOUND")  # type: ignore[arg-type]
    try:
        assert tracing.close(0.01) is False  # returns though shutdown never does
        assert stuck.entered.is_set()
        assert "dropped" in caplog.text
    finally:
        stuck.release.set()
    tracing, _ = traced(1.0, [])
    assert tracing.close(5.0) is True
