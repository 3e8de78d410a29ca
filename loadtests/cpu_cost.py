"""Server CPU time per request: Convoy against the bare grpc.aio echo server, one run.

    python -m loadtests.cpu_cost [--duration 5] [--concurrency 32]

Requests/s on a shared 2-core machine swing with whatever else runs; the CPU seconds a
server process spends per request it answers do not (much): they are read from
/proc/<pid>/stat (user + system, all threads) around the measured interval. The
tiny model, closed loop, client processes beside the servers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass

from .bench import build_request, run_closed_loop
from .launch import ROOT, cpu_seconds, start_convoy


@dataclass(frozen=True)
class Cost:
    server: str
    requests: int
    errors: int
    throughput_rps: float
    cpu_s: float

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(1, self.requests)


def measure(
    name: str, pid: int, url: str, payload: bytes, concurrency: int, duration: float
) -> Cost:
    run_closed_loop(url, "tiny", concurrency, 1.0, warmup=0, payload=payload)  # warm
    before = cpu_seconds(pid)
    result = run_closed_loop(url, "tiny", concurrency, duration, warmup=0, payload=payload)
    used = cpu_seconds(pid) - before
    return Cost(name, result.requests, result.errors, result.throughput_rps, used)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)

    convoy = start_convoy(None)  # the built-in examples
    port = _free_port()
    echo = subprocess.Popen(
        [sys.executable, "-m", "loadtests.echo_server", "--port", str(port)], cwd=ROOT
    )
    try:
        payload = build_request(convoy.url, "tiny", 1)
        time.sleep(1.0)  # the echo server binds
        costs = [
            measure(
                "convoy", convoy.proc.pid, convoy.url, payload, args.concurrency, args.duration
            ),
            measure(
                "echo", echo.pid, f"127.0.0.1:{port}", payload, args.concurrency, args.duration
            ),
        ]
    finally:
        echo.terminate()
        echo.wait(30)
        convoy.stop()
    echo_cost = costs[-1].cpu_us_per_request
    print(f"tiny, closed loop, c={args.concurrency}, {args.duration:g} s each")
    for cost in costs:
        print(
            f"{cost.server:>8}: {cost.throughput_rps:8.1f} req/s  {cost.requests:7d} requests  "
            f"{cost.errors} errors  CPU {cost.cpu_us_per_request:7.1f} µs/request  "
            f"({cost.cpu_us_per_request / echo_cost:4.2f}x echo)"
        )


if __name__ == "__main__":
    main()
