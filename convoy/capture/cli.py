"""`convoy dataset export ...`: argument parsing for the dataset export (dataset.py).

Exit codes: 0 written; 2 a usage error (the message names the flag); 1 nothing to
export (no answered request matched).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from collections.abc import Callable
from typing import Any, TextIO

from .dataset import (
    ExportError,
    ExportRequest,
    Instant,
    export,
    parse_instant,
    resolve_window,
    version_order,
)


def _instant(text: str) -> Instant:
    try:
        return parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version(text: str) -> str:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a model version (1 or more)")
    return str(int(text))


def add_dataset_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `dataset` and its commands to the `convoy` parser's subparsers."""
    dataset: argparse.ArgumentParser = subparsers.add_parser(
        "dataset",
        help="turn captured requests and labels into named, reproducible datasets",
        description="Datasets from what `convoy serve --capture-dir` captured. See "
        "docs/capture.md.",
    )
    commands = dataset.add_subparsers(dest="dataset_command", required=True)
    out = commands.add_parser(
        "export",
        help="one model's answered requests (and labels) as one Parquet file",
        description="Write MODEL's answered requests (status OK) captured under "
        "--capture-dir to PATH (Parquet), in a canonical order, each with its latest label "
        "with --with-labels, and PATH.manifest.json with the dataset_id: a hash of the "
        "rows, the same for the same command over the same captured files.",
    )
    out.add_argument("model", metavar="MODEL")
    out.add_argument(
        "--capture-dir",
        required=True,
        metavar="URI",
        help="the server's --capture-dir: a directory or a pyarrow filesystem URI",
    )
    out.add_argument(
        "--since",
        type=_instant,
        metavar="T",
        help="requests answered at or after T: ISO 8601 (2026-12-01, 2026-12-01T08:00Z; "
        "no zone: UTC) or an age before now (90s, 30m, 24h, 7d, 2w)",
    )
    out.add_argument(
        "--until", type=_instant, metavar="T", help="requests answered before T (as --since)"
    )
    out.add_argument(
        "--version",
        dest="versions",
        action="append",
        type=_version,
        metavar="N",
        help="only this model version (repeat for several; default: every version)",
    )
    out.add_argument(
        "--with-labels",
        action="store_true",
        help="join each request with its latest label from the Feedback RPC "
        "(columns label, label_kind, label_value, label_timestamp; null where none)",
    )
    out.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the Parquet file to write (a path or URI); the manifest goes to PATH.manifest.json",
    )
    return dataset


def command_of(args: argparse.Namespace) -> str:
    """The command as it is recorded in the manifest: every argument in one order."""
    words = ["convoy", "dataset", "export", args.model, "--capture-dir", args.capture_dir]
    if args.since is not None:
        words += ["--since", args.since.text]
    if args.until is not None:
        words += ["--until", args.until.text]
    for version in sorted(set(args.versions or ()), key=version_order):
        words += ["--version", version]
    if args.with_labels:
        words.append("--with-labels")
    words += ["--out", args.out]
    return shlex.join(words)


def run_dataset_command(
    args: argparse.Namespace,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`now`: what an age in --since/--until counts back from."""
    out, err = out or sys.stdout, err or sys.stderr
    since, until = resolve_window(args.since, args.until, now())
    request = ExportRequest(
        model=args.model,
        capture_dir=args.capture_dir,
        out=args.out,
        since=since,
        until=until,
        versions=tuple(sorted(set(args.versions or ()), key=version_order)),
        with_labels=args.with_labels,
        command=command_of(args),
    )
    try:
        done = export(request)
    except ExportError as exc:
        flag = f"{exc.flag}: " if exc.flag and exc.flag not in exc.message else ""
        print(f"convoy dataset export: {flag}{exc.message}", file=err)
        return 2 if exc.flag else 1
    manifest = done.manifest
    coverage = manifest["label_coverage"]
    labelled = "" if coverage is None else f", {coverage:.1%} labelled"
    print(
        f"{done.path}: {manifest['rows']} rows of {manifest['model']} "
        f"(versions {', '.join(manifest['versions'])}){labelled}\n"
        f"dataset_id {manifest['dataset_id']}\n"
        f"manifest {done.manifest_path}",
        file=out,
    )
    return 0
