"""CPU per captured row, the event loop's share and the writer thread's, measured apart
and in-process (no server, no client): what `loadtests.capture_overhead` cannot separate.

    python -m loadtests.capture_cost [--rows N] [--rounds R]

For the built-in `tiny` (16 floats in and out) and `image_classifier` (a 3x64x64 input,
1,000 logits): N answered requests are built as the inference path hands them to the
capture (gRPC-decoded inputs, lying in `bytes`), then each round times the recorder on
every one (thread CPU: the loop's work per request) and one flush of the writer to a
temporary directory (process CPU: building the Arrow table and encoding Parquet, pyarrow's
own threads included). Printed: the median over rounds, in µs per row.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from convoy.batching.request import InferRequest, InferResult
from convoy.capture.recorder import CaptureRecorder
from convoy.capture.writer import CaptureWriter
from convoy.config import CaptureConfig, CaptureSpec, read_model_config, validate_model_config
from convoy.inference.path import Answered

from .monitoring_overhead import examples


@dataclasses.dataclass
class _Served:
    """The part of a ModelVersion the recorder reads."""

    spec: Any
    version_label: str = "1"
    devices: tuple[str, ...] = ("cpu",)


def answered(model: str, count: int) -> list[Answered]:
    folder = examples() / model
    spec = validate_model_config(read_model_config(folder), str(folder / "config.pbtxt"), model)
    served = _Served(dataclasses.replace(spec, capture=CaptureSpec(sample_rate=1.0)))
    (given,), (answer,) = spec.inputs, spec.outputs
    rng = np.random.default_rng(0)
    loop = asyncio.new_event_loop()
    out = []
    for i in range(count):
        values = rng.random((1, *given.dims), dtype=np.float32)
        decoded = np.frombuffer(values.tobytes(), np.float32).reshape(values.shape)
        request = InferRequest(
            f"r{i}", {given.name: decoded}, (answer.name,), 1, (), loop.create_future(),
            arrival_ns=1, dispatch_ns=2,
        )  # fmt: skip
        result = InferResult({answer.name: rng.random((1, *answer.dims), dtype=np.float32)})
        out.append(
            Answered(
                "grpc", None, request.id, served, "none", request, result, None, False, 3,
                lambda: None, True,
            )  # type: ignore[arg-type]  # its own inputs, as a gRPC request's
        )  # fmt: skip
    loop.close()
    return out


def measure(items: list[Answered]) -> tuple[float, float]:
    """(loop µs, writer µs) per row for one round."""
    with tempfile.TemporaryDirectory(prefix="convoy-capture-cost-") as tmp:
        writer = CaptureWriter(CaptureConfig(uri=tmp, flush_s=3600, max_bytes=1 << 40))
        writer.salt = b"\0" * 32  # not opened: no thread, the flush is called here
        record = CaptureRecorder(writer, status_of=lambda error: "INTERNAL")
        start = time.thread_time_ns()
        for item in items:
            record(item)
        recorded = time.thread_time_ns()
        cpu = time.process_time_ns()
        writer.flush()
        flushed = time.process_time_ns()
        if sum(writer.counts.rows.values()) != len(items):  # a cost of rows not written is none
            raise RuntimeError(f"wrote {dict(writer.counts.rows)} of {len(items)} rows")
    return (recorded - start) / len(items) / 1e3, (flushed - cpu) / len(items) / 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000, help="rows of tiny (image: 1/10)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for model, rows in (("tiny", args.rows), ("image_classifier", max(1, args.rows // 10))):
        items = answered(model, rows)
        measure(items)  # pyarrow imported, caches warm
        runs = [measure(items) for _ in range(args.rounds)]
        loop_us = statistics.median(r[0] for r in runs)
        writer_us = statistics.median(r[1] for r in runs)
        print(
            f"{model:>16}: {rows} rows, loop {loop_us:6.2f} µs/row (thread CPU), "
            f"writer {writer_us:7.2f} µs/row (process CPU), median of {args.rounds}"
        )


if __name__ == "__main__":
    main()
