"""MonitoringService over a real grpc.aio server, and `convoy monitor` as its client."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest

from convoy.api.monitoring import add_monitoring_service
from convoy.monitoring.cli import add_monitor_parser, run_monitor
from convoy.monitoring.feedback import FeedbackStore
from convoy.monitoring.monitor import ModelMonitor
from convoy.monitoring.params import parse_monitoring_params
from convoy.monitoring.registry import Monitors
from convoy.pb import convoy_monitoring_pb2 as pb
from convoy.pb import convoy_monitoring_pb2_grpc as pb_grpc
from tests.drift_helpers import scores_of, tabular_spec, write_reference

T = TypeVar("T")


def _monitors(tmp_path: Path) -> Monitors:
    write_reference(tmp_path, np.random.default_rng(0))
    spec = tabular_spec(
        {
            "drift_reference": "reference.npz",
            "drift_window": "100",
            "feedback_reference_accuracy": "0.9",
        }
    )
    params = parse_monitoring_params(spec, "config.pbtxt")
    assert params.drift is not None and params.feedback is not None
    monitor = ModelMonitor.for_model(spec, "1", tmp_path, params.drift)
    rng = np.random.default_rng(1)
    for _ in range(25):
        x = rng.standard_normal((4, 16)).astype(np.float32)
        x[:, 7] += 1.0
        monitor.sampler.offer({"INPUT0": x}, {"SCORES": scores_of(x)})
    monitor.run_once()
    monitors = Monitors()
    monitors.add_monitor(monitor)
    store = monitors.add_feedback(
        FeedbackStore("m", params.feedback, batched=True, labels=["a", "b", "c", "d"])
    )
    store.record("req-1", "1", {"SCORES": np.array([[0.1, 0.9, 0.0, 0.0]], np.float32)})
    return monitors


def _serve(monitors: Monitors, client: Callable[[str], T]) -> T:
    """Run the servicer on a free port and `client(address)` in a thread beside it."""

    async def main() -> T:
        server = grpc.aio.server()
        add_monitoring_service(server, monitors)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await asyncio.to_thread(client, f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_feedback_rpc_judges_and_refuses_with_clear_status(tmp_path: Path) -> None:
    monitors = _monitors(tmp_path)

    def calls(address: str) -> list[object]:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.MonitoringServiceStub(channel)
            results: list[object] = []
            ok = stub.Feedback(pb.FeedbackRequest(model_name="m", id="req-1", class_label="b"))
            results.append((ok.model_version, ok.correct, ok.rolling, ok.window))
            for request in (
                pb.FeedbackRequest(model_name="m", id="req-1", class_index=1),  # judged already
                pb.FeedbackRequest(model_name="nope", id="req-1", class_index=1),
                pb.FeedbackRequest(model_name="m", id="req-2", value=0.5),
                pb.FeedbackRequest(model_name="m", id="req-2"),  # no label
            ):
                try:
                    stub.Feedback(request)
                    results.append("answered")
                except grpc.RpcError as exc:
                    results.append((exc.code(), exc.details()))
            return results

    ok, judged, unknown_model, wrong_type, no_label = _serve(monitors, calls)
    assert ok == ("1", True, 1.0, 1)
    assert judged[0] == grpc.StatusCode.NOT_FOUND and "req-1" in judged[1]  # type: ignore[index]
    assert unknown_model[0] == grpc.StatusCode.NOT_FOUND  # type: ignore[index]
    assert wrong_type[0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]
    assert "classification" in wrong_type[1]  # type: ignore[index]
    assert no_label[0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]
    store = monitors.feedback_store("m")
    assert store is not None and store.refusals()["wrong_type"] == 1


def test_convoy_monitor_prints_the_table_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monitors = _monitors(tmp_path / "model")
    monitors.feedback("m", "req-1", 0)  # a wrong prediction: rolling accuracy 0
    parser = argparse.ArgumentParser(prog="convoy")
    add_monitor_parser(parser.add_subparsers(dest="command"))
    html = tmp_path / "report.html"

    def cli(address: str) -> int:
        args = parser.parse_args(["monitor", "m", "--server", address, "--html", str(html)])
        return run_monitor(args)

    assert _serve(monitors, cli) == 0
    table = capsys.readouterr().out
    assert "INPUT0" in table and "SCORES (output)" in table
    drifted = [line.split() for line in table.splitlines() if line.split()[-1:] == ["DRIFT"]]
    assert ["7"] in [row[:1] for row in drifted]  # the shifted feature, by name
    feedback = [line.split() for line in table.splitlines() if "classification" in line]
    assert feedback == [["1", "classification", "0", "0.9", "1", "1"]]
    page = html.read_text()
    # One plot: feature 7 is the only drifted feature (the scores read features 0-3).
    assert page.count("data:image/png;base64,") == 1
    assert "INPUT0 feature 7" in page

    def unknown(address: str) -> int:
        return run_monitor(parser.parse_args(["monitor", "nope", "--server", address]))

    assert _serve(monitors, unknown) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
