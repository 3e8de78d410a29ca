"""Served throughput with tracing at 1 % against tracing off, on the same repository.

    python -m loadtests.tracing_overhead [--duration S] [--rounds R] [--rate R]

The built-in `tiny`, closed loop, 32 callers, no traceparent sent. Each round starts
`convoy serve` twice: once as shipped (no `--trace-endpoint`: nothing of OpenTelemetry
imported), once with `--trace-endpoint` to an OTLP/gRPC receiver in this process and
`--trace-sample-rate 0.01` (the decision per request, and for the sampled ones a request,
a queue and a batch span exported by the SDK's thread); rounds alternate which comes
first. Printed: req/s, p50 and p99 off and on and their ratios (target: throughput
on/off >= 0.97), the server's CPU per request from /proc, and the spans received.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from .bench import build_request, run_closed_loop
from .launch import cpu_seconds, start_convoy
from .monitoring_overhead import Measurement, examples, make_repository
from .otlp import Receiver, otlp_receiver

MODEL, CONCURRENCY = "tiny", 32
TARGET = 0.97


def run_server(repo: Path, receiver: Receiver | None, args: argparse.Namespace) -> Measurement:
    extra: list[str] = []
    if receiver is not None:
        extra = ["--trace-endpoint", receiver.endpoint, "--trace-sample-rate", str(args.rate)]
    server = start_convoy(repo, *extra)
    try:
        payload = build_request(server.url, MODEL, rows=1)
        run_closed_loop(server.url, MODEL, CONCURRENCY, args.warmup, args.procs,
                        warmup=0, payload=payload)  # fmt: skip
        spans_before = receiver.count if receiver is not None else 0
        cpu_before = cpu_seconds(server.proc.pid)
        result = run_closed_loop(server.url, MODEL, CONCURRENCY, args.duration, args.procs,
                                 warmup=0, payload=payload)  # fmt: skip
        m = Measurement(
            MODEL, receiver is not None, result, cpu_seconds(server.proc.pid) - cpu_before
        )
    finally:
        server.stop()  # flushes the spans still buffered
    spans = f"  spans {receiver.count - spans_before}" if receiver is not None else ""
    print(
        f"  {MODEL} c={CONCURRENCY} tracing {f'{args.rate:g}' if receiver else 'off'} "
        f"{result.throughput_rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
        f"p99 {result.p99_ms:7.2f} ms  server CPU {m.cpu_ms_per_request:6.3f} ms/req  "
        f"errors {result.errors}{spans}",
        flush=True,
    )
    return m


def summarise(measurements: list[Measurement]) -> str:
    """On/off ratios paired by round: the median and the range."""
    off = [m for m in measurements if not m.monitored]
    on = [m for m in measurements if m.monitored]

    def ratios(figure: Callable[[Measurement], float]) -> list[float]:
        return [figure(a) / max(figure(b), 1e-9) for a, b in zip(on, off, strict=True)]

    def shown(values: list[float]) -> str:
        spread = f" [{min(values):.3f}..{max(values):.3f}]" if len(values) > 1 else ""
        return f"x{statistics.median(values):.3f}{spread}"

    throughput = ratios(lambda m: m.result.throughput_rps)
    verdict = "meets" if statistics.median(throughput) >= TARGET else "misses"
    return (
        f"  {MODEL}: throughput {shown(throughput)} ({verdict} the {TARGET} target)  "
        f"p50 {shown(ratios(lambda m: m.result.p50_ms))}  "
        f"p99 {shown(ratios(lambda m: m.result.p99_ms))}  "
        f"server CPU/request {shown(ratios(lambda m: m.cpu_ms_per_request))}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs of server starts")
    parser.add_argument("--rate", type=float, default=0.01, help="--trace-sample-rate when on")
    args = parser.parse_args(argv)
    measurements: list[Measurement] = []
    with (
        tempfile.TemporaryDirectory(prefix="convoy-tracing-overhead-") as tmp,
        otlp_receiver(keep=False) as receiver,
    ):
        repo = make_repository(Path(tmp) / "models", examples())
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", flush=True)
            for traced in (False, True) if i % 2 == 0 else (True, False):
                measurements.append(run_server(repo, receiver if traced else None, args))
    print(
        f"\ntracing at {args.rate:g} / off, {args.duration:g} s, "
        f"median [range] over {args.rounds} round(s):"
    )
    print(summarise(measurements))


if __name__ == "__main__":
    main()
