"""Served throughput with capture at 1.0 against capture off, on the same repository.

    python -m loadtests.capture_overhead [--duration S] [--rounds R]

The built-in `tiny` (closed loop, 32 callers) and `image_classifier` (16 callers). Each
round starts `convoy serve` twice on one repository copy: once as shipped, once with
`--capture-dir` and `capture_sample_rate: 1` on both models (every request copied on the
loop and written to Parquet by the writer's thread); rounds alternate which comes first.
Printed per model: req/s, p50 and p99 off and on and their ratios (target: throughput
on/off >= 0.95), the server's CPU per request from /proc, and the rows the capture wrote
and dropped (every answered request should be a row).
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path

from .bench import build_request, run_closed_loop
from .launch import cpu_seconds, start_convoy
from .monitoring_overhead import Measurement, examples, make_repository, summarise

CONCURRENCY = {"tiny": 32, "image_classifier": 16}
CAPTURE = 'parameters { key: "capture_sample_rate" value { string_value: "1" } }\n'


def capture_counts(metrics_port: int | None) -> dict[str, float]:
    """convoy_capture_rows_total and convoy_capture_dropped_total, summed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    counts = {"rows": 0.0, "dropped": 0.0}
    for line in lines:
        for name in counts:
            if line.startswith(f"convoy_capture_{name}_total{{"):
                counts[name] += float(line.rsplit(" ", 1)[1])
    return counts


def run_server(repo: Path, captured: bool, args: argparse.Namespace) -> list[Measurement]:
    configs = {m: (repo / m / "config.pbtxt").read_text() for m in CONCURRENCY}
    extra: list[str] = []
    if captured:
        for model, text in configs.items():
            (repo / model / "config.pbtxt").write_text(text + CAPTURE)
        extra = ["--capture-dir", str(repo.parent / "capture")]
    server = start_convoy(repo, *extra)
    measurements = []
    try:
        for model in args.models:
            concurrency = CONCURRENCY[model]
            payload = build_request(server.url, model, rows=1)
            run_closed_loop(server.url, model, concurrency, args.warmup, args.procs,
                            warmup=0, payload=payload)  # fmt: skip
            cpu_before = cpu_seconds(server.proc.pid)
            result = run_closed_loop(server.url, model, concurrency, args.duration, args.procs,
                                     warmup=0, payload=payload)  # fmt: skip
            m = Measurement(model, captured, result, cpu_seconds(server.proc.pid) - cpu_before)
            print(
                f"  {model:>16} c={concurrency:<3} capture {'on ' if captured else 'off'} "
                f"{result.throughput_rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                f"p99 {result.p99_ms:7.2f} ms  server CPU {m.cpu_ms_per_request:6.3f} ms/req  "
                f"errors {result.errors}",
                flush=True,
            )
            measurements.append(m)
        if captured:
            so_far = capture_counts(server.metrics_port)
            print(
                f"  capture so far: {so_far['rows']:.0f} rows written, "
                f"{so_far['dropped']:.0f} dropped (the rest is written at SIGTERM)"
            )
    finally:
        server.stop()
        for model, text in configs.items():
            (repo / model / "config.pbtxt").write_text(text)
    return measurements


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs of server starts")
    parser.add_argument("--models", nargs="+", choices=list(CONCURRENCY), default=list(CONCURRENCY))
    args = parser.parse_args(argv)
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="convoy-capture-overhead-") as tmp:
        repo = make_repository(Path(tmp) / "models", examples())
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", flush=True)
            for captured in (False, True) if i % 2 == 0 else (True, False):
                measurements += run_server(repo, captured, args)
    print(f"\ncapture on / off, {args.duration:g} s, median [range] over {args.rounds} round(s):")
    for model in args.models:
        print(summarise(model, measurements))


if __name__ == "__main__":
    main()
