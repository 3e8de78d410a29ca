"""Full garbage collections on the event loop: tail latency with the heap frozen
after start-up (the default) against `--no-gc-freeze`, one run.

    python -m loadtests.gc_pauses [--duration 10] [--rounds 2] [--concurrency 32]

With the built-in examples loaded, a full collection walks ~250,000 long-lived
objects and stops the loop for ~100 ms, every few seconds under load; the tiny
model's p99.9 shows it. Each round measures both servers, one after the other
(never side by side on a small machine); CPU per request is from /proc.
"""

from __future__ import annotations

import argparse

from .bench import Result, build_request, run_closed_loop
from .launch import cpu_seconds, start_convoy

VARIANTS = {"frozen (default)": (), "--no-gc-freeze": ("--no-gc-freeze",)}


def measure(flags: tuple[str, ...], concurrency: int, duration: float) -> tuple[Result, float]:
    server = start_convoy(None, *flags)
    try:
        payload = build_request(server.url, "tiny", 1)
        run_closed_loop(server.url, "tiny", concurrency, 2.0, warmup=0, payload=payload)
        before = cpu_seconds(server.proc.pid)
        result = run_closed_loop(
            server.url, "tiny", concurrency, duration, warmup=0, payload=payload
        )
        used = cpu_seconds(server.proc.pid) - before
    finally:
        server.stop()
    return result, 1e6 * used / max(1, result.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"tiny, closed loop, c={args.concurrency}, {args.duration:g} s per point")
    for round_ in range(1, args.rounds + 1):
        for name, flags in VARIANTS.items():
            r, cpu_us = measure(flags, args.concurrency, args.duration)
            print(
                f"  round {round_}  {name:>17}: {r.throughput_rps:7.1f} req/s  "
                f"CPU {cpu_us:6.1f} us/req  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f}  "
                f"p99.9 {r.p999_ms:7.2f}  errors {r.errors}",
                flush=True,
            )


if __name__ == "__main__":
    main()
