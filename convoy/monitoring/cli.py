"""`convoy monitor MODEL [--server HOST:PORT] [--html report.html]`: a gRPC client of
the MonitoringService that prints the latest drift figures and writes an HTML report.

convoy/cli.py adds the subcommand with add_monitor_parser() and runs it with
run_monitor(); nothing here starts a server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .detectors import DriftResult, FeatureDrift, Histogram
from .feedback import VersionFeedback
from .monitor import TensorStatus
from .report import DriftReport, TensorReport, format_table, html_report

COMMAND = "monitor"


def add_monitor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `monitor` to the `convoy` subcommands (argparse's subparsers action)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="show a model's current drift figures and accuracy from feedback",
        description="Ask a running Convoy server for the latest drift test of each monitored "
        "input and output of MODEL (per feature where the test has features) and its "
        "rolling accuracy from feedback; print them as a table and, with --html, write a "
        "report with reference-vs-current histograms of the features that drifted.",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument(
        "--server", default="localhost:8001", metavar="HOST:PORT",
        help="the server's gRPC address (default localhost:8001)",
    )  # fmt: skip
    parser.add_argument("--model-version", default="", help="one version only (default: all)")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write an HTML report here")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)"
    )
    return parser


def run_monitor(args: argparse.Namespace) -> int:
    """Print the table (and write the report); 2 when the server refuses or is away."""
    import grpc

    from ..pb import convoy_monitoring_pb2 as pb
    from ..pb import convoy_monitoring_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.server) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        try:
            response = stub.DriftStatus(
                pb.DriftStatusRequest(model_name=args.model, model_version=args.model_version),
                timeout=args.timeout,
            )
        except grpc.RpcError as exc:
            print(f"convoy monitor: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    report = report_from_proto(response)
    print(format_table(report))
    if args.html is not None:
        args.html.write_text(html_report(report), encoding="utf-8")
        print(f"report written to {args.html}", file=sys.stderr)
    return 0


def report_from_proto(response: Any) -> DriftReport:
    """A DriftStatusResponse as the report's dataclasses (protobuf stays at the edge)."""
    tensors = []
    for t in response.tensors:
        result = None
        if t.state == "scored":
            result = DriftResult(
                is_drift=t.drift,
                p_value=t.p_value,
                distance=t.distance,
                threshold=t.threshold,
                test=t.test,
                window_size=t.window_size,
                features=tuple(
                    FeatureDrift(f.name, f.p_value, f.distance, f.drift, _histogram(f))
                    for f in t.features
                ),
                histogram=_histogram(t),
            )
        status = TensorStatus(
            name=t.name,
            is_output=t.is_output,
            test=t.test,
            state=t.state,
            reference_size=t.reference_size,
            windows=t.windows,
            alarms=t.alarms,
            result=result,
            scored_at_s=None,
        )
        tensors.append(TensorReport(t.model_version, status, t.age_seconds if result else None))
    feedback = tuple(
        VersionFeedback(
            version=f.model_version,
            task=f.task,
            window=f.window,
            rolling=f.rolling if f.has_rolling else None,
            reference=f.reference if f.has_reference else None,
            accepted=f.accepted,
        )
        for f in response.feedback
    )
    return DriftReport(response.model_name, response.reference, tuple(tensors), feedback)


def _histogram(message: Any) -> Histogram | None:
    if not message.HasField("histogram"):
        return None
    h = message.histogram
    return Histogram(tuple(h.labels), tuple(h.reference), tuple(h.current), tuple(h.edges))
