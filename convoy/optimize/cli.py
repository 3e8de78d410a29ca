"""`convoy optimize`: argument parsing -> OptimizeRequest -> optimize. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConvoyError
from ..progress import progress_bar


def add_optimize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `optimize` to `convoy`'s subcommands (the `add_subparsers` object)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "optimize",
        help="write an FP16 or INT8 version of a model, checked against the original",
        description="Convert version N of MODEL_DIR into version M beside it (ONNX: FP16 "
        "with FP32 inputs and outputs, or INT8 dynamic, or static with --calibration; "
        "TorchScript: dynamic INT8 of Linear layers). Both versions' outputs are compared "
        "on a sample and their bare throughput measured; M is installed only if it agrees "
        "within the floors. The report is printed and saved as M/optimize_report.json and "
        ".txt. Exit status: 0 installed, 1 below the floors, 2 refused.",
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--from-version", type=int, required=True, metavar="N")
    parser.add_argument("--to-version", type=int, required=True, metavar="M")
    precision = parser.add_mutually_exclusive_group(required=True)
    precision.add_argument("--fp16", action="store_true", help="FP16 weights and compute")
    precision.add_argument(
        "--int8", action="store_true", help="INT8 (dynamic unless --calibration)"
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.npz",
        help="arrays named after the model file's inputs (batch first): static INT8 "
        "calibration for ONNX, and the sample both versions are compared on",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing version M")
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=64,
        help="rows of seeded data compared without --calibration (default 64)",
    )
    parser.add_argument(
        "--bench-seconds",
        type=float,
        default=2.0,
        help="seconds each version runs per batch size, the two alternating (default 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--min-cosine", type=float, help="override the floor of min cosine")
    parser.add_argument("--min-top1", type=float, help="override the floor of top-1 agreement")
    return parser


def run_optimize(args: argparse.Namespace) -> int:
    from .optimizer import optimize
    from .plan import OptimizeRequest

    request = OptimizeRequest(
        model_dir=args.model_dir,
        from_version=args.from_version,
        to_version=args.to_version,
        precision="fp16" if args.fp16 else "int8",
        calibration=args.calibration,
        force=args.force,
        sample_rows=args.sample_rows,
        bench_seconds=args.bench_seconds,
        seed=args.seed,
    )
    floors = {}
    if args.min_cosine is not None:
        floors["min_cosine"] = args.min_cosine
    if args.min_top1 is not None:
        floors["top1"] = args.min_top1
    try:
        report = optimize(request, progress_bar, floors)
    except ConvoyError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    print(report.to_text(), end="")
    return 0 if report.passed else 1
