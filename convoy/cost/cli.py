"""`convoy cost [--server URL] [--since 1h] [--price cpu=0.04,gpu=2.50]
[--prometheus-url URL] [--json]`: per model and version, inferences, busy seconds per
device, share of the machine, memory held and the cost of 1,000 inferences
(docs/models.md). Nothing here starts a server."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from typing import Any

COMMAND = "cost"


def add_cost_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="what each model's inferences cost, from a server's metrics or Prometheus",
        description="Per model and version: inferences, busy seconds per device, share of "
        "the machine's busy time, memory held, and cost per 1,000 inferences at the given "
        "hourly prices. From the server's /metrics these are totals since it started (the "
        "output says so); with --prometheus-url, increase() over --since.",
    )
    parser.add_argument(
        "--server", default="localhost:8002", metavar="URL",
        help="the server's metrics address, host:port or URL (default localhost:8002)",
    )  # fmt: skip
    parser.add_argument(
        "--prometheus-url", metavar="URL",
        help="read from this Prometheus instead, over --since",
    )  # fmt: skip
    parser.add_argument(
        "--since", default="1h",
        help="the window with --prometheus-url, such as 30m, 1h, 7d (default 1h)",
    )  # fmt: skip
    parser.add_argument(
        "--price", default="cpu=0.04,gpu=2.50", metavar="cpu=P,gpu=P",
        help="hourly prices: per CPU instance (core) hour and per GPU hour "
        "(default cpu=0.04,gpu=2.50)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)"
    )
    return parser


def run_cost(args: argparse.Namespace) -> int:
    """Print the table or JSON; 2 on a bad flag or an unreachable source."""
    from ..errors import InvalidInput
    from ..rollouts.spec import parse_duration
    from .report import cost_rows, format_table, parse_prices
    from .sources import from_prometheus, from_server

    try:
        prices = parse_prices(args.price)
    except ValueError as exc:
        print(f"convoy cost: --price: {exc}", file=sys.stderr)
        return 2
    try:
        since = parse_duration(args.since, "--since")
    except InvalidInput as exc:
        print(f"convoy cost: {exc.message}", file=sys.stderr)
        return 2
    try:
        if args.prometheus_url:
            readings = from_prometheus(args.prometheus_url, since, args.timeout)
            window = f"over the last {args.since} (Prometheus {args.prometheus_url})"
        else:
            readings = from_server(args.server, args.timeout)
            window = (
                f"totals since the server started ({args.server}; --since needs --prometheus-url)"
            )
    except (OSError, urllib.error.URLError, ValueError) as exc:
        source = args.prometheus_url or args.server
        print(f"convoy cost: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    rows = cost_rows(readings, prices)
    if args.json:
        body = {"window": window, "prices": prices, "models": [r.as_json() for r in rows]}
        print(json.dumps(body, indent=2))
    else:
        print(format_table(rows, window))
    return 0
