"""`convoy slo rules`: the Prometheus rules of the declared objectives. docs/slo.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from .slo_rules import DEFAULT_RUNBOOK


def add_slo_parser(subparsers: Any) -> argparse.ArgumentParser:
    slo: argparse.ArgumentParser = subparsers.add_parser(
        "slo",
        help="service-level objectives: generate their Prometheus rules",
        description="Service-level objectives declared in <model>/slo.yaml or --slo-config "
        "FILE. See docs/slo.md.",
    )
    commands = slo.add_subparsers(dest="slo_command", required=True)
    rules = commands.add_parser(
        "rules",
        help="write Prometheus recording rules and burn-rate alerts",
        description="Recording rules (each objective's error ratio over 5m, 30m, 1h, 2h, "
        "6h, 1d, 3d, its budget and what is left of it) and multi-window multi-burn-rate "
        "alerts (14.4x over 1h and 5m, 6x over 6h and 30m: page; 1x over 3d and 6h: ticket).",
    )
    rules.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help="read each <DIR>/<model>/slo.yaml",
    )
    rules.add_argument(
        "--slo-config",
        type=Path,
        metavar="FILE",
        help="objectives of many models: 'models: {MODEL: {objectives: [...]}}'",
    )
    rules.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    rules.add_argument(
        "--runbook-url",
        default=DEFAULT_RUNBOOK,
        metavar="URL",
        help=f"the alerts' runbook_url annotation (default {DEFAULT_RUNBOOK})",
    )
    return slo


def run_slo(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from ..errors import ConfigError
    from .objectives import load_objectives
    from .slo_rules import generate_rules, render_rules

    if args.model_repository is None and args.slo_config is None:
        print("convoy slo rules: give --model-repository DIR or --slo-config FILE", file=err)
        return 2
    if args.model_repository is not None and not args.model_repository.is_dir():
        print(f"convoy slo rules: --model-repository: {args.model_repository} is not a directory",
              file=err)  # fmt: skip
        return 2
    try:
        declared = load_objectives(args.model_repository, args.slo_config)
    except ConfigError as exc:
        print(f"convoy slo rules: {exc.message}", file=err)
        return 2
    if not declared:
        print(f"convoy slo rules: no slo.yaml under {args.model_repository}", file=err)
        return 2
    text = render_rules(generate_rules(declared, runbook=args.runbook_url))
    if args.out is None:
        out.write(text)
    else:
        args.out.write_text(text)
        count = sum(len(d.objectives) for d in declared.values())
        print(f"{args.out}: rules for {count} objectives of {len(declared)} models", file=err)
    return 0
