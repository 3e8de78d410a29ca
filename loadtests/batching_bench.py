"""The batching benchmark: served throughput and latency against the bare model.

    python -m loadtests.batching_bench --duration 10

One run, one machine: starts `convoy serve` on the built-in examples, sweeps
the CNN and the tiny model at each concurrency (closed loop, several client
processes), stops the server, then measures each bare model called in a loop
at the batch sizes the server actually formed, and the batcher's own
per-request overhead with a no-op backend. Prints a markdown report (also
written to --out). Figures, never assertions: the machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
from pathlib import Path

from convoy.repository.examples import default_examples_dir, ensure_examples

from .bare import measure
from .bench import Result, run_closed_loop
from .launch import start_convoy
from .overhead import overhead_us

MODELS = ("image_classifier", "tiny")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    examples = ensure_examples(default_examples_dir())

    server = start_convoy(examples, "--metrics-port", "-1")
    served: dict[str, list[Result]] = {}
    try:
        for model in MODELS:
            served[model] = []
            for c in levels:
                r = run_closed_loop(server.url, model, c, args.duration, args.procs)
                print(r.line(), flush=True)
                served[model].append(r)
    finally:
        server.stop()

    bare: dict[str, dict[int, float]] = {}
    for model in MODELS:
        sizes = sorted({1, *levels, *(max(1, round(r.avg_batch_size)) for r in served[model])})
        bare[model] = {
            b.batch_size: b.rows_per_s for b in measure(examples / model, sizes, args.duration / 2)
        }
        for size, rate in bare[model].items():
            print(f"{model:>18} bare batch {size:<4} {rate:10.1f} rows/s", flush=True)
    overhead = {c: asyncio.run(overhead_us(20_000, c)) for c in (1, 32)}

    report = render(args, served, bare, overhead)
    print(report)
    if args.out:
        args.out.write_text(report)


def render(
    args: argparse.Namespace,
    served: dict[str, list[Result]],
    bare: dict[str, dict[int, float]],
    overhead: dict[int, tuple[float, float]],
) -> str:
    lines = [
        f"### Batching benchmark, {datetime.date.today().isoformat()}",
        "",
        f"`python -m loadtests.batching_bench --duration {args.duration:g}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"client: {args.procs} processes on the same machine.",
        "",
        "| model | concurrency | req/s | p50 ms | p99 ms | mean batch "
        "| bare rows/s at that batch | served / bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, results in served.items():
        for r in results:
            size = max(1, round(r.avg_batch_size))
            limit = bare[model].get(size, 0.0)
            ratio = r.rows_per_s / limit if limit else 0.0
            lines.append(
                f"| {model} | {r.concurrency} | {r.throughput_rps:.0f} | {r.p50_ms:.2f} | "
                f"{r.p99_ms:.2f} | {r.avg_batch_size:.2f} | {limit:.0f} | {ratio:.2f} |"
            )
    lines.append("")
    for model, results in served.items():
        by_c = {r.concurrency: r for r in results}
        if 1 in by_c and 32 in by_c and by_c[1].throughput_rps:
            gain = by_c[32].throughput_rps / by_c[1].throughput_rps
            lines.append(f"- {model}: batching gain, c=32 over c=1: **{gain:.2f}x**")
    lines.append(
        "- bare model, rows/s by batch size: "
        + "; ".join(
            f"{m}: " + ", ".join(f"{b}: {v:.0f}" for b, v in sorted(sizes.items()))
            for m, sizes in bare.items()
        )
    )
    for c, (us, batch) in overhead.items():
        lines.append(
            f"- batcher alone (no-op backend, no gRPC), c={c}: **{us:.1f} us/request** "
            f"(mean batch {batch:.1f})"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
