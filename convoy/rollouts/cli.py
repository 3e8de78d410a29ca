"""`convoy rollout ...`: argument parsing and a thin gRPC client of convoy.admin.RolloutService.

The server validates everything (one place, the same messages for the CLI, the
API and the declared policy file); the client only parses numbers and durations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .spec import parse_duration

DEFAULT_SERVER = "localhost:8001"
TOKEN_ENV = "CONVOY_TOKEN"


def _steps(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a list of percents such as 5,25,50,100"
        ) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of 1 or more")
    return value


def _duration(text: str) -> float:
    from ..errors import InvalidInput

    try:
        return parse_duration(text, "duration")
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _time(text: str) -> str:
    """A time for the server, as an absolute ISO 8601 time: "6h" means six hours
    before now here, whatever the server's clock."""
    from ..capture.replay_cli import parse_time

    return parse_time(text).isoformat()


def add_rollout_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `rollout` and its commands to the `convoy` parser's subparsers."""
    rollout: argparse.ArgumentParser = subparsers.add_parser(
        "rollout",
        help="start, watch and steer safe rollouts (canary, blue-green, shadow, A/B)",
        description="Control rollouts on a running server through its convoy.admin "
        "RolloutService. See docs/rollouts.md.",
    )
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--server", default=DEFAULT_SERVER, metavar="HOST:PORT", help="default localhost:8001"
    )
    client.add_argument(
        "--token",
        default=None,
        help=f"bearer token with the admin role (default: ${TOKEN_ENV}, if set)",
    )
    client.add_argument("--tls-ca", type=Path, help="PEM CA to verify a TLS server")
    client.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up after this long (start waits for the load; default 600)",
    )
    commands = rollout.add_subparsers(dest="rollout_command", required=True)

    start = commands.add_parser("start", parents=[client], help="start a rollout")
    start.add_argument("model")
    start.add_argument("--version", required=True, help="the candidate version")
    start.add_argument(
        "--strategy", required=True, choices=["canary", "blue-green", "shadow", "ab"]
    )
    start.add_argument(
        "--steps",
        type=_steps,
        help="canary percents (default 5,25,50,100); ab: the candidate's percent (default 50)",
    )
    start.add_argument(
        "--step-interval",
        type=_duration,
        metavar="DURATION",
        help="time per step / bake / report interval, e.g. 30s (default)",
    )
    start.add_argument(
        "--max-error-rate",
        type=float,
        metavar="RATE",
        help="server-side error rate gate (default 0.01)",
    )
    start.add_argument("--max-p99-ms", type=float, metavar="MS", help="compute p99 gate")
    start.add_argument("--max-queue-p99-ms", type=float, metavar="MS", help="queue p99 gate")
    start.add_argument(
        "--max-divergence",
        type=float,
        metavar="X",
        help="largest max-abs-diff of any compared output",
    )
    start.add_argument(
        "--max-burn-rate",
        type=float,
        metavar="X",
        help="the candidate's SLO burn rate in the step window (the model's declared "
        "objectives, docs/slo.md); e.g. 14.4",
    )
    start.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="refuse to start while the model's error budget (its SLOs' whole period, 28d "
        "by default) is spent, as Prometheus records it from `convoy slo rules`",
    )
    start.add_argument(
        "--ignore-budget",
        action="store_true",
        help="start even though --prometheus-url shows the error budget spent",
    )
    start.add_argument(
        "--min-requests",
        type=_count,
        metavar="N",
        help="fewer per window: inconclusive, hold (default 100)",
    )
    start.add_argument(
        "--shadow-fraction",
        type=float,
        metavar="F",
        help="share of requests also run on the other version",
    )
    start.add_argument(
        "--keep-warm",
        type=_duration,
        metavar="DURATION",
        help="keep the replaced version loaded this long (default 5m)",
    )
    start.add_argument("--salt", default="", help="ab experiment salt")
    start.add_argument(
        "--replay-since",
        type=_time,
        metavar="T",
        help="replay gate: first replay the requests captured since T (an ISO 8601 time, "
        "UTC unless zoned, or a duration ago such as 6h) on the candidate against the "
        "version serving now; the rollout starts only if they pass (needs the server's "
        "--capture-dir)",
    )
    start.add_argument(
        "--replay-until", type=_time, metavar="T", help="replay gate: ... and before T"
    )
    start.add_argument(
        "--replay-max-diff-rate",
        type=float,
        metavar="X",
        help="replay gate: the share of answers that may differ beyond the noise floor "
        "(default 0.01)",
    )
    start.add_argument(
        "--replay-max-requests",
        type=_count,
        metavar="K",
        help="replay gate: the K most recent captured requests (default 1000)",
    )

    status = commands.add_parser("status", parents=[client], help="show rollouts")
    status.add_argument("model", nargs="?", default="")
    status.add_argument("--json", action="store_true", help="one JSON object per line per model")

    for name, text in (
        ("promote", "make the candidate the default now"),
        ("rollback", "send all traffic back to stable now"),
        ("pause", "hold the current weights"),
        ("resume", "continue a paused rollout"),
    ):
        command = commands.add_parser(name, parents=[client], help=text)
        command.add_argument("model")
    weight = commands.add_parser("weight", parents=[client], help="ab: set the candidate's percent")
    weight.add_argument("model")
    weight.add_argument("percent", type=float)
    return rollout


def start_request(args: argparse.Namespace) -> Any:
    from ..pb import convoy_admin_pb2 as pb

    spec = pb.RolloutSpec(strategy=args.strategy, steps=args.steps or [], salt=args.salt)
    if args.step_interval is not None:
        spec.step_interval_s = args.step_interval
    if args.shadow_fraction is not None:
        spec.shadow_fraction = args.shadow_fraction
    if args.keep_warm is not None:
        spec.keep_warm_s = args.keep_warm
    gates = ("max_error_rate", "max_p99_ms", "max_queue_p99_ms", "max_divergence", "max_burn_rate")
    for name in gates:
        value = getattr(args, name)
        if value is not None:
            setattr(spec.gates, name, value)
    if args.min_requests is not None:
        spec.gates.min_requests = args.min_requests
    replay_flags = ("replay_until", "replay_max_diff_rate", "replay_max_requests")
    if args.replay_since is None and any(getattr(args, f) is not None for f in replay_flags):
        raise argparse.ArgumentTypeError(
            "--replay-since: the replay gate's other flags need it (the window's start)"
        )
    for name in ("replay_since", *replay_flags):
        value = getattr(args, name)
        if value is not None:
            setattr(spec, name, value)
    return pb.StartRolloutRequest(model=args.model, version=args.version, spec=spec)


def status_json(status: Any) -> dict[str, Any]:
    """The documented `status --json` object of one model (from a pb.RolloutStatus)."""

    def number(value: float) -> float | str:
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")

    windows = {}
    for version, w in sorted(status.windows.items()):
        windows[version] = {
            "requests": w.requests,
            "errors": w.errors,
            "error_rate": w.error_rate,
            "queue_p99_ms": w.queue_p99_ms if w.HasField("queue_p99_ms") else None,
            "compute_p99_ms": w.compute_p99_ms if w.HasField("compute_p99_ms") else None,
            "compared": w.compared,
            "max_divergence": number(w.max_divergence) if w.HasField("max_divergence") else None,
            "top1_agreement": w.top1_agreement if w.HasField("top1_agreement") else None,
            "shadow_shed": w.shadow_shed,
            "burn_rate": w.burn_rate if w.HasField("burn_rate") else None,
            "burn_slo": w.burn_slo or None,
        }
    return {
        "model": status.model,
        "strategy": status.strategy,
        "phase": status.phase,
        "stable": status.stable,
        "candidate": status.candidate,
        "weights": {v: status.weights[v] for v in sorted(status.weights)},
        "reason": status.reason,
        "analysis": status.analysis,
        "step": status.step,
        "steps": list(status.steps),
        "shadow_fraction": status.shadow_fraction,
        "windows": windows,
        "replay": json.loads(status.replay) if status.replay else None,
    }


def _print_human(statuses: list[Any], out: TextIO) -> None:
    for s in statuses:
        weights = ", ".join(f"v{v} {s.weights[v]:g}%" for v in sorted(s.weights))
        step = f" step {s.step}/{len(s.steps)}" if s.step else ""
        print(
            f"{s.model}: {s.strategy} v{s.stable} -> v{s.candidate}, {s.phase}{step}; {weights}",
            file=out,
        )
        print(f"  reason:   {s.reason}", file=out)
        if s.analysis:
            print(f"  analysis: {s.analysis}", file=out)
        if s.replay:
            report = json.loads(s.replay)
            verdict = "passed" if report.get("passed") else "failed"
            print(
                f"  replay:   {verdict}: {report.get('requests')} requests, diff_rate "
                f"{report.get('diff_rate')}, noise_floor {report.get('noise_floor')}",
                file=out,
            )


def _budget_refusal(args: argparse.Namespace, err: TextIO) -> int | None:
    """`start --prometheus-url`: the exit status when the model's error budget is spent
    (1) or cannot be read (2); None to go on."""
    if args.prometheus_url is None:
        return None
    from ..monitoring.budget import BudgetUnknown, read_budgets, refusal

    try:
        budgets = read_budgets(args.prometheus_url, args.model, min(args.timeout, 30.0))
    except BudgetUnknown as exc:
        if args.ignore_budget:
            return None
        print(f"convoy rollout start: {exc}; --ignore-budget starts without it", file=err)
        return 2
    if not budgets:
        print(
            f"convoy rollout start: note: Prometheus records no error budget for model "
            f"'{args.model}' (no SLO, or the rules of `convoy slo rules` not loaded)",
            file=err,
        )
        return None
    why = refusal(args.model, budgets)
    if why is None:
        return None
    if args.ignore_budget:
        print(f"convoy rollout start: --ignore-budget: starting although {why}", file=err)
        return None
    print(f"convoy rollout start: refused: {why}", file=err)
    return 1


def run_rollout_command(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    channel_factory: Callable[[argparse.Namespace], Any] | None = None,
) -> int:
    """Run one `convoy rollout` command; 0 on success, 1 when the server refused."""
    import grpc

    from ..pb import convoy_admin_pb2 as pb
    from ..pb import convoy_admin_pb2_grpc as pb_grpc

    start = None
    if args.rollout_command == "start":
        try:
            start = start_request(args)
        except argparse.ArgumentTypeError as exc:
            print(f"convoy rollout start: {exc}", file=err)
            return 2
        refused = _budget_refusal(args, err)
        if refused is not None:
            return refused
    channel = (channel_factory or _channel)(args)
    stub = pb_grpc.RolloutServiceStub(channel)
    token = args.token or os.environ.get(TOKEN_ENV)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    call = {"metadata": metadata, "timeout": args.timeout}
    command = args.rollout_command
    try:
        if command == "status":
            reply = stub.Status(pb.RolloutStatusRequest(model=args.model), **call)
            statuses = list(reply.rollouts)
            if args.json:
                for status in statuses:
                    print(json.dumps(status_json(status), sort_keys=False), file=out)
            elif not statuses:
                print(f"no rollout{' for ' + args.model if args.model else ''}", file=out)
            else:
                _print_human(statuses, out)
            return 0
        if command == "start":
            status = stub.Start(start, **call)
        elif command == "weight":
            request = pb.SetRolloutWeightRequest(model=args.model, candidate_percent=args.percent)
            status = stub.SetWeight(request, **call)
        else:
            method = getattr(stub, command.capitalize())
            status = method(pb.RolloutModelRequest(model=args.model), **call)
        _print_human([status], out)
        return 0
    except grpc.RpcError as exc:
        print(f"convoy rollout {command}: {exc.code().name}: {exc.details()}", file=err)
        return 1
    finally:
        channel.close()


def _channel(args: argparse.Namespace) -> Any:
    import grpc

    if args.tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
        return grpc.secure_channel(args.server, credentials)
    return grpc.insecure_channel(args.server)
