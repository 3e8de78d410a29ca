"""Served throughput with SLOs declared against none, on the same repository.

    python -m loadtests.slo_overhead [--duration S] [--rounds R]

The built-in `tiny`, closed loop, 32 callers. Each round starts `convoy serve` twice on
one repository copy: once as shipped, once with `--slo-config` declaring an availability
and a latency objective for it (every answered request then goes through the answer
observer and is counted by both; burn rates are computed once a second); rounds
alternate which comes first. Printed: req/s, p50 and p99 off and on and their ratios,
the server's CPU per request from /proc, and the events the server counted (every
answered request should be one per objective).
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path

from .bench import build_request, run_closed_loop
from .launch import cpu_seconds, start_convoy
from .monitoring_overhead import Measurement, examples, make_repository, summarise

MODEL, CONCURRENCY = "tiny", 32
DECLARED = """models:
  tiny:
    objectives:
      - {name: availability, kind: availability, target: 99.9}
      - {name: fast, kind: latency, target: 99, threshold_ms: 50}
"""


def events(metrics_port: int | None) -> float:
    """convoy_slo_events_total of tiny's availability objective, good and bad."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("convoy_slo_events_total{") and 'slo="availability"' in line
    )


def run_server(repo: Path, declared: bool, args: argparse.Namespace) -> Measurement:
    extra: list[str] = []
    if declared:
        config = repo.parent / "slos.yaml"
        config.write_text(DECLARED)
        extra = ["--slo-config", str(config)]
    server = start_convoy(repo, *extra)
    try:
        payload = build_request(server.url, MODEL, rows=1)
        run_closed_loop(server.url, MODEL, CONCURRENCY, args.warmup, args.procs,
                        warmup=0, payload=payload)  # fmt: skip
        cpu_before = cpu_seconds(server.proc.pid)
        result = run_closed_loop(server.url, MODEL, CONCURRENCY, args.duration, args.procs,
                                 warmup=0, payload=payload)  # fmt: skip
        m = Measurement(MODEL, declared, result, cpu_seconds(server.proc.pid) - cpu_before)
        counted = f"  events counted {events(server.metrics_port):.0f}" if declared else ""
        print(
            f"  {MODEL:>6} c={CONCURRENCY:<3} SLOs {'on ' if declared else 'off'} "
            f"{result.throughput_rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
            f"p99 {result.p99_ms:7.2f} ms  server CPU {m.cpu_ms_per_request:6.3f} ms/req  "
            f"errors {result.errors}{counted}",
            flush=True,
        )
        return m
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs of server starts")
    args = parser.parse_args(argv)
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="convoy-slo-overhead-") as tmp:
        repo = make_repository(Path(tmp) / "models", examples())
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", flush=True)
            for declared in (False, True) if i % 2 == 0 else (True, False):
                measurements.append(run_server(repo, declared, args))
    print(f"\nSLOs on / off, {args.duration:g} s, median [range] over {args.rounds} round(s):")
    print(summarise(MODEL, measurements))


if __name__ == "__main__":
    main()
