"""`convoy replay MODEL --capture-dir URI --candidate N ...`: captured requests sent again
to a candidate version and to a baseline, compared, and judged (docs/capture.md, Replay).

Exit 0 when the gates pass, 1 when one fails (or the candidate does not load), 2 on a
usage error (argparse's own, or one named here with its flag): a CI pipeline can run it.
convoy/cli.py adds the subcommand with add_replay_parser() and runs it with run_replay().
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..arguments import grpc_address, number
from .dataset import parse_instant

if TYPE_CHECKING:
    from .replay import CapturedRequest
    from .replay_report import Gates, ReplayReport, Tolerance
    from .replay_targets import Target, TargetModel

COMMAND = "replay"
TOKEN_ENV = "CONVOY_TOKEN"
# Against a live server a replay is capped at this many requests per second unless
# --rate says otherwise: it shares the server with callers. In process, no cap.
SERVER_RATE = 50.0

PASSED, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """A wrong invocation: the message names the flag."""


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO 8601 date or time (UTC unless it names a zone), or an age before `now`
    (30m, 6h, 7d): dataset export's parse_instant, resolved."""
    try:
        instant = parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return instant.resolve(now or dt.datetime.now(dt.UTC))


def add_replay_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `replay` to the `convoy` subcommands (argparse's subparsers action)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="replay captured requests against a candidate version and judge the difference",
        description="Send the requests captured for MODEL (convoy serve --capture-dir) "
        "again, inputs exactly as captured, to the candidate version and to the baseline "
        "(default: the version that served them), compare the answers against the "
        "baseline's own noise, and judge the gates. Exit 0: passed; 1: a gate failed; "
        "2: a usage error. See docs/capture.md.",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument(
        "--capture-dir", required=True, metavar="URI",
        help="the server's --capture-dir (a directory or a pyarrow filesystem URI)",
    )  # fmt: skip
    parser.add_argument("--candidate", required=True, metavar="N", help="the version judged")
    parser.add_argument(
        "--baseline", metavar="M",
        help="the version compared against (default: the one version other than the "
        "candidate that served the captured requests)",
    )  # fmt: skip
    parser.add_argument(
        "--since", type=parse_time, metavar="T",
        help="requests answered from T: an ISO 8601 time (UTC unless zoned) or a duration "
        "ago such as 6h or 7d (default: all)",
    )  # fmt: skip
    parser.add_argument("--until", type=parse_time, metavar="T", help="... and before T")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--model-repository", type=Path, metavar="DIR",
        help="load both versions here, in this process, with the code convoy serve runs "
        "(default: the built-in example models)",
    )  # fmt: skip
    where.add_argument(
        "--server", type=grpc_address, metavar="URL",
        help="replay against a live server over KServe v2 gRPC instead, at host:port or "
        "grpc://host:port (both versions must be loaded there); requests are background "
        "priority and rate-capped",
    )  # fmt: skip
    parser.add_argument(
        "--max-requests", type=number(int, 0, strict=True), default=1000, metavar="K",
        help="replay the K most recent captured requests (default 1000)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=number(float, 0, strict=True), metavar="R",
        help=f"requests per second, both versions together (default {SERVER_RATE:g} with "
        "--server, no cap in process)",
    )  # fmt: skip
    parser.add_argument(
        "--rtol", type=number(float, 0, strict=False), default=1e-5, metavar="R",
        help="relative tolerance of an equal answer (default 1e-5)",
    )  # fmt: skip
    parser.add_argument(
        "--atol", type=number(float, 0, strict=False), default=1e-6, metavar="A",
        help="absolute tolerance of an equal answer (default 1e-6)",
    )  # fmt: skip
    parser.add_argument(
        "--max-diff-rate", type=number(float, 0, strict=False), default=0.01, metavar="X",
        help="the share of requests whose answer may differ beyond the noise floor "
        "(default 0.01)",
    )  # fmt: skip
    parser.add_argument(
        "--max-accuracy-drop", type=number(float, 0, strict=False), default=0.01, metavar="Y",
        help="how far the candidate's accuracy on labelled requests may fall below the "
        "baseline's (default 0.01)",
    )  # fmt: skip
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write an HTML report here")
    parser.add_argument(
        "--token", default=None,
        help=f"bearer token for --server (default: ${TOKEN_ENV}, if set)",
    )  # fmt: skip
    parser.add_argument("--tls-ca", type=Path, help="PEM CA to verify a TLS --server")
    return parser


def run_replay(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Replay, report, judge: 0 passed, 1 failed, 2 usage error."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        report = asyncio.run(_replay(args, err))
    except UsageError as exc:
        print(f"convoy replay: {exc}", file=err)
        return USAGE
    document = report.as_json()
    try:
        if args.report is not None:
            args.report.write_text(json.dumps(document, indent=2) + "\n")
        if args.html is not None:
            from .replay_report import html_report

            args.html.write_text(html_report(document))
    except OSError as exc:
        print(f"convoy replay: cannot write the report: {exc}", file=err)
        return USAGE
    _print_summary(document, out)
    return PASSED if report.passed else FAILED


async def _replay(args: argparse.Namespace, err: TextIO) -> ReplayReport:
    from .replay_report import Gates, Tolerance
    from .replay_targets import InProcessTarget, ServerTarget

    if args.since is not None and args.until is not None and args.since >= args.until:
        raise UsageError("--since must be before --until")
    if args.baseline is not None and args.baseline == args.candidate:
        raise UsageError("--baseline: the candidate cannot be its own baseline")
    captured = await read_capture(
        args.capture_dir, args.model, args.since, args.until, args.max_requests
    )
    target: Target
    if args.server is not None:
        token = args.token or os.environ.get(TOKEN_ENV)
        target = ServerTarget(args.server, args.model, token, args.tls_ca)
        rate = args.rate or SERVER_RATE
    else:
        root = args.model_repository
        if root is None:
            from ..repository.examples import default_examples_dir, ensure_examples

            root = ensure_examples(default_examples_dir())
        if not (Path(root) / args.model).is_dir():
            raise UsageError(f"--model-repository: no model '{args.model}' in {root}")
        target = InProcessTarget.create(Path(root), args.model)
        rate = args.rate
    try:
        return await replay_captured(
            target,
            captured,
            args.model,
            args.candidate,
            args.baseline,
            max_requests=args.max_requests,
            rate=rate,
            tolerance=Tolerance(args.rtol, args.atol),
            gates=Gates(args.max_diff_rate, args.max_accuracy_drop),
            server=args.server,
            err=err,
        )
    finally:
        await target.close()


@dataclasses.dataclass(frozen=True)
class Captured:
    """What a replay reads from the capture directory: the rows, their labels (None:
    none collected) and the window they were read from (ISO times, None: open)."""

    rows: list[CapturedRequest]
    labels: dict[str, Any] | None
    window: dict[str, str | None]
    # Rows read but not replayable, by select's reasons (read_recent leaves them out).
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


async def read_capture(
    capture_dir: str,
    model: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    max_requests: int | None = None,
) -> Captured:
    """The model's replayable rows in [since, until), the newest `max_requests` of them
    at most (read no further back than that), read off the event loop; UsageError
    naming --capture-dir when there are none or they cannot be read."""
    from .replay import CaptureReadError, read_labels, read_recent

    try:
        rows, skipped = await asyncio.to_thread(
            read_recent, capture_dir, model, since, until, max_requests
        )
        labels = await asyncio.to_thread(read_labels, capture_dir, model)
    except CaptureReadError as exc:
        raise UsageError(f"--capture-dir: {exc}") from None
    window = {
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    if not rows and not skipped:
        raise UsageError(
            f"--capture-dir: no captured request of model '{model}' in {capture_dir}"
            + (f" between {window['since'] or 'the start'} and {window['until'] or 'now'}"
               if since or until else "")
        )  # fmt: skip
    return Captured(rows, labels, window, skipped)


async def replay_captured(
    target: Target,
    captured: Captured,
    model: str,
    candidate_version: str,
    baseline_version: str | None,
    *,
    max_requests: int,
    rate: float | None,
    tolerance: Tolerance,
    gates: Gates,
    server: str | None = None,
    err: TextIO | None = None,
) -> ReplayReport:
    """Replay the captured requests on both versions through `target` (left open: its
    owner closes it), compare and judge. UsageError, naming the flag, when none can be
    replayed or a version is not there. The server's
    replay gate (docs/rollouts.md) runs this too, on its own inference path."""
    from .replay import select
    from .replay_report import build_report
    from .replay_targets import Backoff, Pacer, replay

    rows, labels, window = captured.rows, captured.labels, captured.window
    if not rows:
        raise _none_replayable(model, captured.skipped)
    # Callers' answered requests only: a shadow run or an earlier replay served nobody.
    baseline_version = baseline_version or _served_baseline(
        select(rows).requests, candidate_version
    )
    baseline = await _describe(target, model, baseline_version, "--baseline", server)
    load_failure = None
    try:
        candidate = await _describe(target, model, candidate_version, "--candidate", server)
    except _LoadFailed as failed:  # the candidate's own fault: a failed gate
        load_failure = str(failed)
    if load_failure is not None:
        report = build_report(
            model, candidate_version, baseline_version, [],
            tolerance=tolerance, gates=gates, labels=labels, window=window,
        )  # fmt: skip
        return dataclasses.replace(report, reasons=[load_failure, *report.reasons])
    selection = select(rows, baseline.required, max_requests)
    skipped = Counter(captured.skipped)
    skipped.update(selection.skipped)
    selection = dataclasses.replace(selection, skipped=dict(skipped))
    if not selection.requests:
        raise _none_replayable(model, selection.skipped)
    if err is not None:
        print(
            f"replaying {len(selection.requests)} requests of '{model}' on versions "
            f"{candidate_version} and {baseline_version}" + (f" at {rate:g}/s" if rate else ""),
            file=err,
        )
    replayed = await replay(target, selection.requests, candidate, baseline, Pacer(rate), Backoff())
    output = next(iter(baseline.outputs), None)
    return build_report(
        model,
        candidate_version,
        baseline_version,
        replayed,
        tolerance=tolerance,
        gates=gates,
        labels=labels,
        batched=baseline.batched,
        label_output=output,
        class_names=baseline.class_names.get(output) if output else None,
        skipped=selection.skipped,
        window=window,
    )


def _none_replayable(model: str, skipped: dict[str, int]) -> UsageError:
    left = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    return UsageError(
        f"--capture-dir: none of the {sum(skipped.values())} captured requests of model "
        f"'{model}' can be replayed ({left})"
    )


class _LoadFailed(Exception):
    pass


async def _describe(
    target: Target, model: str, version: str, flag: str, server: str | None
) -> TargetModel:
    """The version, loaded where it is loaded here; UsageError when it is not there,
    _LoadFailed when it is but does not load."""
    from ..errors import ConvoyError
    from .replay_targets import InProcessTarget, Refused, UnknownVersion

    try:
        if isinstance(target, InProcessTarget):
            await target.load(version)
        return await target.describe(version)
    except UnknownVersion as exc:
        hint = " (load it there: version_policy, or a rollout)" if server else ""
        raise UsageError(f"{flag}: {exc}{hint}") from None
    except Refused as exc:
        if exc.code in ("NOT_FOUND", "INVALID_ARGUMENT"):
            raise UsageError(f"{flag}: {exc.message}") from None
        raise UsageError(f"--server: {server}: {exc}") from None
    except ConvoyError as exc:
        message = f"version {version} of '{model}' failed to load: {exc.message}"
        if flag == "--candidate":
            raise _LoadFailed(message) from None
        raise UsageError(f"{flag}: {message}") from None


def _served_baseline(rows: Sequence[CapturedRequest], candidate: str) -> str:
    """The one version other than the candidate that answered callers' requests."""
    served = Counter(r.version for r in rows if r.version != candidate)
    if len(served) == 1:
        return next(iter(served))
    if not served:
        raise UsageError(
            f"--baseline: every captured request was served by the candidate, version "
            f"{candidate}: name the version to compare with"
        )
    versions = ", ".join(f"{v} ({n} requests)" for v, n in sorted(served.items()))
    raise UsageError(f"--baseline: the captured requests were served by {versions}: name one")


def _print_summary(report: dict[str, Any], out: TextIO) -> None:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    verdict = "PASSED" if report["passed"] else "FAILED"
    print(
        f"{report['model']}: candidate {report['candidate']} against baseline "
        f"{report['baseline']}: {verdict}",
        file=out,
    )
    print(
        f"  requests {report['requests']}, diff_rate {fmt(report['diff_rate'])}, "
        f"noise_floor {fmt(report['noise_floor'])}",
        file=out,
    )
    for version in (report["candidate"], report["baseline"]):
        latency = report["latency_ms"].get(version) or {}
        print(
            f"  version {version}: errors {report['errors'][version]}, p50 "
            f"{fmt(latency.get('p50'))} ms, p99 {fmt(latency.get('p99'))} ms, accuracy "
            f"{fmt(report['accuracy'][version])}",
            file=out,
        )
    for reason in report["reasons"]:
        print(f"  - {reason}", file=out)
