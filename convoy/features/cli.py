"""`convoy skew MODEL --capture-dir URI ...`: argument parsing and the report (skew.py).

Exit codes: 0 no feature past --max-mismatch-rate or --max-missing-rate; 1 one is, or
nothing to compare (no captured row holds served features); 2 a usage error (the
message names the flag).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..arguments import number
from ..capture.dataset import Instant, iso, parse_instant, resolve_window

if TYPE_CHECKING:
    from .skew import FeatureSkew

COMMAND = "skew"


def _instant(text: str) -> Instant:
    try:
        return parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_skew_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `skew` to the `convoy` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="compare the features a model was served with Feast's offline store",
        description="Read MODEL's captured requests (convoy serve --capture-dir; the served "
        "features and their timestamps are captured as inputs), ask the model's Feast "
        "repository (its feast_repo) for the point-in-time features of the same entities "
        "at the moments they were served (get_historical_features), and report per feature "
        "the mismatch rate, mean absolute difference, staleness and rows the online store "
        "had no value for. See docs/features.md.",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument(
        "--capture-dir", required=True, metavar="URI",
        help="the server's --capture-dir: a directory or a pyarrow filesystem URI",
    )  # fmt: skip
    parser.add_argument(
        "--model-repository", type=Path, default=Path("."), metavar="DIR",
        help="the repository holding MODEL's config.pbtxt and so its Feast repository "
        "(default: the current directory)",
    )  # fmt: skip
    parser.add_argument(
        "--since", type=_instant, metavar="T",
        help="requests answered at or after T: ISO 8601 (2026-12-01T08:00Z; no zone: UTC) "
        "or an age before now (90s, 30m, 24h, 7d, 2w)",
    )  # fmt: skip
    parser.add_argument("--until", type=_instant, metavar="T", help="... and before T")
    parser.add_argument(
        "--sample", type=number(int, 0, strict=True), default=10_000, metavar="N",
        help="compare the N most recent served rows (default 10000)",
    )  # fmt: skip
    parser.add_argument(
        "--max-mismatch-rate", type=number(float, 0, strict=False), default=0.0, metavar="X",
        help="exit 1 when a feature's mismatch rate is above X (default 0: any mismatch)",
    )  # fmt: skip
    parser.add_argument(
        "--max-missing-rate", type=number(float, 0, strict=False), default=0.5, metavar="X",
        help="exit 1 when the share of rows the online store had no value for is above X "
        "for a feature (default 0.5: a feature never materialised fails)",
    )  # fmt: skip
    parser.add_argument("--report", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--html", metavar="PATH", help="write the report as an HTML page")
    return parser


def run_skew(
    args: argparse.Namespace,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    from .skew import SkewError, compare, offline, open_features, read_served

    out, err = out or sys.stdout, err or sys.stderr
    since, until = resolve_window(args.since, args.until, now())
    if since and until and since >= until:
        print(f"convoy skew: --since: {iso(since)} is not before --until {iso(until)}", file=err)
        return 2
    try:
        spec, store = open_features(args.model_repository, args.model)
        served = read_served(args.capture_dir, args.model, spec, since, until, args.sample)
        if served.items == 0:
            why = f": {served.skipped_reason}" if served.skipped_reason else ""
            raise SkewError(f"nothing to compare: no captured row of '{args.model}'{why}")
        looked = offline(store, spec, served)
        found = compare(served, looked, spec.names, spec.output.datatype)
    except SkewError as exc:
        flag = f"{exc.flag}: " if exc.flag and exc.flag not in exc.message else ""
        print(f"convoy skew: {flag}{exc.message}", file=err)
        return 2 if exc.flag else 1
    failed = failing(found, served.items, args.max_mismatch_rate, args.max_missing_rate)
    notes = [served.skipped_reason] if served.skipped_reason else []
    if looked.stamps_error:
        notes.append(f"staleness not measured: {looked.stamps_error}")
    report = {
        "model": args.model,
        "capture_dir": args.capture_dir,
        "since": iso(since) if since else None,
        "until": iso(until) if until else None,
        "rows": served.items,
        "skipped_rows": served.skipped,
        "notes": notes,
        "features": {name: skew.as_json() for name, skew in found.items()},
        "max_mismatch_rate": args.max_mismatch_rate,
        "max_missing_rate": args.max_missing_rate,
        "failed": failed,
        "passed": not failed,
    }
    print(_text(report), file=out)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.html:
        Path(args.html).write_text(_html(report))
    return 1 if failed else 0


def failing(
    found: dict[str, FeatureSkew], rows: int, max_mismatch_rate: float, max_missing_rate: float
) -> list[str]:
    """The features past a threshold. Missing rows count too: mismatch_rate is over the
    rows the online store had a value for, so a feature never materialised has none."""
    return sorted(
        name
        for name, f in found.items()
        if f.mismatch_rate > max_mismatch_rate or f.missing / max(rows, 1) > max_missing_rate
    )


def _text(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['rows']} served rows compared with Feast's offline store",
        f"{'feature':<24} {'mismatch':>9} {'mean |diff|':>12} {'staleness s':>12} {'missing':>8}",
    ]
    for name, f in report["features"].items():
        staleness = "-" if f["staleness_s"] is None else f"{f['staleness_s']:.1f}"
        mark = "  <- above a threshold" if name in report["failed"] else ""
        lines.append(
            f"{name:<24} {f['mismatch_rate']:>9.2%} {f['mean_abs_diff']:>12.4g} "
            f"{staleness:>12} {f['missing']:>8}{mark}"
        )
    lines += [f"note: {note}" for note in report["notes"]]
    lines.append("PASS" if report["passed"] else f"FAIL: {', '.join(report['failed'])}")
    return "\n".join(lines)


def _html(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr{' class=failed' if name in report['failed'] else ''}><td>{html.escape(name)}</td>"
        f"<td>{f['mismatch_rate']:.2%}</td><td>{f['mean_abs_diff']:.4g}</td>"
        f"<td>{'-' if f['staleness_s'] is None else format(f['staleness_s'], '.1f')}</td>"
        f"<td>{f['missing']}</td></tr>"
        for name, f in report["features"].items()
    )
    title = html.escape(f"convoy skew {report['model']}")
    verdict = "PASS" if report["passed"] else "FAIL: " + html.escape(", ".join(report["failed"]))
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>"
        "body{font-family:sans-serif}td,th{padding:4px 10px;text-align:right}"
        ".failed{background:#fdd}</style></head><body>"
        f"<h1>{title}</h1><p>{report['rows']} served rows, {html.escape(str(report['since']))}"
        f" to {html.escape(str(report['until']))}; --max-mismatch-rate "
        f"{report['max_mismatch_rate']}, --max-missing-rate {report['max_missing_rate']}</p>"
        + "".join(f"<p>note: {html.escape(n)}</p>" for n in report["notes"])
        + "<table><tr><th>feature</th><th>mismatch rate</th>"
        "<th>mean |diff|</th><th>staleness s</th><th>missing</th></tr>"
        f"{rows}</table><p>{verdict}</p></body></html>\n"
    )
