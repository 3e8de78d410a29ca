"""OpenTelemetry traces (docs/tracing.md), read by a real OTLP receiver that the test starts:
a real server exports to it over gRPC, requests come through tritonclient's gRPC and HTTP
clients and through a front-end process, each with a W3C traceparent of its own trace.

The model `lin` answers y = 2x (version 1) or 3x (version 2); `batched` is the same with a
dynamic batcher that waits for a full batch of 4; `ens` is an ensemble of one `lin` step.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

pytest.importorskip("opentelemetry.sdk", reason="the otel extra (OpenTelemetry's SDK) is missing")
pytest.importorskip("opentelemetry.proto", reason="opentelemetry-proto is missing")

from convoy.pb import convoy_admin_pb2 as admin
from convoy.pb import convoy_admin_pb2_grpc as admin_grpc
from loadtests.otlp import Receiver, Span, otlp_receiver

from .conftest import ServerProcess, start_server
from .linear import linear_source, write_linear_model

pytestmark = pytest.mark.e2e

SERVER, INTERNAL = 2, 1  # trace_pb2.Span.SpanKind
UNSET, ERROR = 0, 2  # trace_pb2.Status.StatusCode

ENSEMBLE = """
name: "ens"
platform: "ensemble"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
ensemble_scheduling {
  step [ { model_name: "lin" model_version: -1
           input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } } ]
}
"""
# Four concurrent callers make one batch: it leaves when full, long before the delay.
FULL_BATCHES = "dynamic_batching { max_queue_delay_microseconds: 5000000 }\n"
ONE_INSTANCE = "instance_group [ { count: 1 kind: KIND_CPU } ]\n"


def write_repository(root: Path) -> Path:
    write_linear_model(root, "lin", {1: linear_source(2), 2: linear_source(3)}, extra=ONE_INSTANCE)
    write_linear_model(root, "batched", {1: linear_source(2)}, extra=ONE_INSTANCE + FULL_BATCHES)
    (root / "ens" / "1").mkdir(parents=True)
    (root / "ens" / "config.pbtxt").write_text(ENSEMBLE)
    return root


class Caller:
    """A caller's span: the traceparent it sends, and the ids to find its trace by."""

    def __init__(self, sampled: bool = True) -> None:
        self.trace_id = secrets.token_hex(16)
        self.span_id = secrets.token_hex(8)
        self.traceparent = f"00-{self.trace_id}-{self.span_id}-{'01' if sampled else '00'}"

    @property
    def headers(self) -> dict[str, str]:
        return {"traceparent": self.traceparent}


def grpc_infer(url: str, model: str, caller: Caller | None, x: float = 1.0) -> float:
    name, out = ("IN", "OUT") if model == "ens" else ("X", "Y")
    tensor = grpcclient.InferInput(name, [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), x, np.float32))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(model, [tensor], headers=caller.headers if caller else None)
    return float(result.as_numpy(out)[0, 0])


def in_trace(spans: list[Span], caller: Caller) -> list[Span]:
    return [s for s in spans if s.trace_id == caller.trace_id]


def named(spans: list[Span], name: str) -> Span:
    (span,) = [s for s in spans if s.name == name]
    return span


def linked_to(spans: list[Span], span: Span) -> list[Span]:
    return [s for s in spans if (span.trace_id, span.span_id) in s.links]


def request_and_batch(receiver: Receiver, caller: Caller, name: str) -> tuple[Span, Span]:
    """Once exported: the caller's request span `name` and the batch span linked to it."""

    def found(spans: list[Span]) -> bool:
        mine = [s for s in in_trace(spans, caller) if s.name == name]
        return bool(mine) and bool(linked_to(spans, mine[0]))

    spans = receiver.wait_for(found)
    request = named(in_trace(spans, caller), name)
    (batch,) = linked_to(spans, request)
    return request, batch


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("traced"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


# Spans are exported every 50 ms here (OpenTelemetry's own setting; 5 s by default).
QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def traced(repo: Path, receiver: Receiver) -> Iterator[ServerProcess]:
    """Every request without a traceparent sampled too (rate 1)."""
    proc = start_server(
        repo,
        "--frontends", "1",
        "--trace-endpoint", receiver.endpoint,
        "--trace-sample-rate", "1",
        env=QUICK_EXPORT,
    )  # fmt: skip
    yield proc
    proc.stop()


def test_a_grpc_request_continues_its_callers_trace(
    traced: ServerProcess, receiver: Receiver
) -> None:
    caller = Caller()
    assert grpc_infer(traced.url, "lin", caller, 5.0) == 10.0
    request, batch = request_and_batch(receiver, caller, "infer lin")
    assert request.parent_id == caller.span_id and request.kind == SERVER
    assert request.attributes == {
        "convoy.model.name": "lin",
        "convoy.model.version": "1",
        "convoy.transport": "grpc",
        "convoy.request.rows": 1,
        "convoy.batch.size": 1,
        "convoy.status_code": "OK",
        "rpc.grpc.status_code": 0,
    }
    assert request.status == UNSET and request.service == "convoy"
    queue = named(in_trace(receiver.spans(), caller), "queue")
    assert queue.parent_id == request.span_id and queue.kind == INTERNAL
    assert request.start_ns <= queue.start_ns <= queue.end_ns <= request.end_ns
    # The batch is a trace of its own, linked both ways with the request.
    assert batch.trace_id != caller.trace_id and batch.parent_id == ""
    assert (batch.trace_id, batch.span_id) in request.links
    assert batch.attributes["convoy.model.name"] == "lin"
    assert batch.attributes["convoy.model.version"] == "1"
    assert batch.attributes["convoy.batch.size"] == 1
    assert batch.attributes["convoy.batch.device"] == "cpu"
    assert batch.attributes["convoy.status_code"] == "OK"
    assert queue.end_ns <= batch.start_ns <= batch.end_ns <= request.end_ns


def test_an_http_request_continues_its_callers_trace(
    traced: ServerProcess, receiver: Receiver
) -> None:
    caller = Caller()
    tensor = httpclient.InferInput("X", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), 4.0, np.float32), binary_data=False)
    client = httpclient.InferenceServerClient(traced.http_url)
    try:
        result = client.infer("lin", [tensor], headers=caller.headers, request_id="h-1")
    finally:
        client.close()
    assert float(result.as_numpy("Y")[0, 0]) == 8.0
    request, batch = request_and_batch(receiver, caller, "infer lin")
    assert request.parent_id == caller.span_id
    assert request.attributes["convoy.transport"] == "http"
    assert request.attributes["convoy.request.id"] == "h-1"
    assert request.attributes["convoy.model.version"] == "1"
    assert (batch.trace_id, batch.span_id) in request.links


def test_one_batch_span_links_every_request_it_ran(
    traced: ServerProcess, receiver: Receiver
) -> None:
    callers = [Caller() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda c: grpc_infer(traced.url, "batched", c[1], c[0]), enumerate(callers))
        )
    assert answers == [0.0, 2.0, 4.0, 6.0]
    requests = [request_and_batch(receiver, c, "infer batched") for c in callers]
    batches = {batch.span_id: batch for _, batch in requests}
    assert len(batches) == 1, "four callers, one full batch"
    (batch,) = batches.values()
    assert set(batch.links) == {(r.trace_id, r.span_id) for r, _ in requests}
    assert batch.attributes["convoy.batch.size"] == 4
    assert batch.attributes["convoy.batch.requests"] == 4
    for request, _ in requests:
        assert request.attributes["convoy.batch.size"] == 4
        assert request.attributes["convoy.request.rows"] == 1


def test_an_unsampled_traceparent_is_not_recorded(
    traced: ServerProcess, receiver: Receiver
) -> None:
    unsampled, sampled = Caller(sampled=False), Caller()
    assert grpc_infer(traced.url, "lin", unsampled) == 2.0
    assert grpc_infer(traced.url, "lin", sampled) == 2.0
    spans = receiver.wait_for(lambda spans: bool(in_trace(spans, sampled)))
    assert in_trace(spans, unsampled) == []
    assert not [s for s in spans if s.parent_id == unsampled.span_id]


def test_a_refused_request_says_why(traced: ServerProcess, receiver: Receiver) -> None:
    missing, bad = Caller(), Caller()
    with pytest.raises(InferenceServerException, match="unknown"):
        grpc_infer(traced.url, "unknown", missing)
    tensor = grpcclient.InferInput("X", [1, 2], "FP32")  # dims [1] per row
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    with grpcclient.InferenceServerClient(traced.url) as client:
        with pytest.raises(InferenceServerException):
            client.infer("lin", [tensor], headers=bad.headers)
    spans = receiver.wait_for(lambda s: bool(in_trace(s, missing)) and bool(in_trace(s, bad)))
    (refused,) = in_trace(spans, missing)
    assert refused.attributes["convoy.status_code"] == "NOT_FOUND"
    assert refused.attributes["rpc.grpc.status_code"] == 5
    assert refused.status == UNSET  # the caller's mistake, not the server's fault
    (invalid,) = in_trace(spans, bad)
    assert invalid.attributes["convoy.status_code"] == "INVALID_ARGUMENT"
    assert invalid.attributes["convoy.model.version"] == "1"


def test_ensemble_steps_are_children_of_the_ensemble_request(
    traced: ServerProcess, receiver: Receiver
) -> None:
    caller = Caller()
    assert grpc_infer(traced.url, "ens", caller, 3.0) == 6.0
    step, batch = request_and_batch(receiver, caller, "step lin")
    spans = in_trace(receiver.spans(), caller)
    ensemble = named(spans, "infer ens")
    assert ensemble.parent_id == caller.span_id
    assert step.parent_id == ensemble.span_id and step.kind == INTERNAL
    assert step.attributes["convoy.model.version"] == "1"
    assert step.attributes["convoy.status_code"] == "OK"
    assert named(spans, "queue").parent_id == step.span_id
    assert batch.attributes["convoy.model.name"] == "lin"


def test_a_shadow_copy_is_a_child_of_the_request_it_copies(
    traced: ServerProcess, receiver: Receiver
) -> None:
    channel = grpc.insecure_channel(traced.url)
    rollouts = admin_grpc.RolloutServiceStub(channel)
    spec = admin.RolloutSpec(strategy="shadow", shadow_fraction=1.0, step_interval_s=600)
    spec.gates.min_requests = 1_000_000
    rollouts.Start(admin.StartRolloutRequest(model="lin", version="2", spec=spec))
    try:
        caller = Caller()
        assert grpc_infer(traced.url, "lin", caller, 2.0) == 4.0  # stable answers
        shadow, batch = request_and_batch(receiver, caller, "shadow lin")
    finally:
        rollouts.Rollback(admin.RolloutModelRequest(model="lin"))
        channel.close()
    request = named(in_trace(receiver.spans(), caller), "infer lin")
    assert shadow.parent_id == request.span_id
    assert shadow.attributes["convoy.model.version"] == "2"
    assert request.attributes["convoy.model.version"] == "1"
    assert batch.attributes["convoy.model.version"] == "2"


def test_rate_zero_sends_nothing_but_a_sampled_callers_trace_through_a_front_end(
    repo: Path,
) -> None:
    """Through `--frontends 2`; exported at the default interval (5 s), so the spans
    seen are those that the server's stop flushed."""
    with otlp_receiver() as receiver:
        proc = start_server(repo, "--frontends", "2", "--trace-endpoint", receiver.endpoint)
        try:
            for x in range(5):
                assert grpc_infer(proc.url, "lin", None, float(x)) == 2.0 * x
            caller = Caller()
            assert grpc_infer(proc.url, "lin", caller) == 2.0
        finally:
            assert proc.stop() == 0
        spans = receiver.spans()
    request = named(in_trace(spans, caller), "infer lin")
    assert request.parent_id == caller.span_id
    (batch,) = linked_to(spans, request)
    assert {s.span_id for s in spans} == {batch.span_id} | {
        s.span_id for s in in_trace(spans, caller)
    }


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys, convoy.cli, convoy.app\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"
