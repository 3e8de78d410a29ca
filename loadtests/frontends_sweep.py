"""`convoy serve --frontends N` swept against the bare grpc.aio echo server, one run.

    python -m loadtests.frontends_sweep [--duration 5] [--frontends 1,2,4,8] [--concurrency 32]
        [--procs 2] [--connections 8] [--server-cpus 0-9 --client-cpus 10-15]

For each N a fresh server (the tiny model alone) and the same closed loop: `--concurrency`
callers in client processes, sending one pre-serialised request over `--connections` gRPC
connections in all. More than one connection matters: the kernel hands each *connection*
to one front end (SO_REUSEPORT hashes the 4-tuple), so a client with one connection per
process would keep N - procs front ends idle whatever N is. The echo server
(loadtests/echo_server.py) answers the same loop before the sweep and, with
`--echo-runs 2`, after it; the ratio is to the mean of its runs.

CPU seconds (user + system, all threads) from /proc over the measured interval: the
engine's own, and every server process's (the engine and its descendants, found through
/proc/<pid>/task/*/children: the front ends and multiprocessing's resource tracker).
With front ends, the engine's main thread alone too: its event loop takes every request
and answer, so its CPU per request bounds what one engine serves on a many-core host
(its instance and ZeroMQ threads run on other cores).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from convoy.repository.examples import default_examples_dir, ensure_examples

from .bench import _summarise, build_request
from .launch import ROOT, cpu_seconds, link_model, start_convoy
from .shm_bench import Loop, closed_loop

MODEL = "tiny"


def cpu_list(text: str) -> frozenset[int]:
    """ "0-9,12" -> {0, ..., 9, 12}, as taskset reads it."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus:
        raise argparse.ArgumentTypeError(f"no cores in {text!r}")
    return frozenset(cpus)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (children of every thread, not only the main one)."""
    found = [pid]
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    pending.append(child)
    return found


def _cpu_of(pids: list[int]) -> dict[int, float]:
    cpu = {}
    for pid in pids:
        try:
            cpu[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return cpu


def _is_frontend(pid: int) -> bool:
    """A front end is a spawned child; the resource tracker is started another way."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"spawn_main" in cmdline


@dataclass
class Point:
    server: str
    frontends: int  # 0: the echo server
    loop: Loop
    engine_cpu_s: float
    loop_cpu_s: float  # the engine's main thread: its event loop
    all_cpu_s: float
    frontend_cpu_s: list[float] = field(default_factory=list)
    changes: str = ""  # processes that appeared or vanished during the interval

    @property
    def requests(self) -> int:
        return len(self.loop.latencies)

    def per_request_us(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / max(1, self.requests)

    @property
    def busy_frontends(self) -> int:
        """Front ends that did a visible share of the front-end work (an idle gRPC
        server process costs next to nothing)."""
        total = sum(self.frontend_cpu_s)
        return sum(1 for cpu in self.frontend_cpu_s if total and cpu > 0.05 * total)


def measure(
    server: str,
    frontends: int,
    pid: int,
    url: str,
    payload: bytes,
    args: argparse.Namespace,
) -> Point:
    payloads = [payload] * args.concurrency
    channels = math.ceil(args.connections / args.procs)
    if args.warmup > 0:
        closed_loop(url, payloads, args.procs, args.warmup, channels, args.client_cpus)
    pids = process_tree(pid)
    before = _cpu_of(pids)
    loop_before = cpu_seconds(pid, pid)
    loop = closed_loop(url, payloads, args.procs, args.duration, channels, args.client_cpus)
    loop_cpu = cpu_seconds(pid, pid) - loop_before
    after_pids = process_tree(pid)
    after = _cpu_of(sorted(set(pids) | set(after_pids)))
    used = {p: after[p] - before.get(p, 0.0) for p in after}
    changes = []
    if gone := sorted(set(pids) - set(after)):
        changes.append(f"exited {gone}")
    if new := sorted(set(after_pids) - set(pids)):
        changes.append(f"appeared {new}")
    frontend_cpu = [used[p] for p in after if p != pid and _is_frontend(p)] if frontends > 1 else []
    return Point(
        server=server,
        frontends=frontends,
        loop=loop,
        engine_cpu_s=used.get(pid, 0.0),
        loop_cpu_s=loop_cpu,
        all_cpu_s=sum(used.values()),
        frontend_cpu_s=frontend_cpu,
        changes="; ".join(changes),
    )


def start_echo() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.echo_server", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "echo server on HOST:PORT" once it listens
    if not line.startswith("echo server on "):
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line!r}")
    return proc, line.split()[-1]


def table(points: list[Point]) -> str:
    echoes = [p for p in points if p.frontends == 0]
    echo_us = sum(p.per_request_us(p.all_cpu_s) for p in echoes) / max(1, len(echoes))
    lines = [
        "| server | req/s | p50 ms | p99 ms | errors | engine CPU per request "
        "| all processes CPU per request | all vs echo | front ends with traffic |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in points:
        s = _summarise(
            point.server, 0, 1, point.loop.latencies, point.loop.errors,
            point.loop.seconds, point.loop.seconds, 0.0,
        )  # fmt: skip
        busy = f"{point.busy_frontends} of {point.frontends}" if point.frontends > 1 else "-"
        all_us = point.per_request_us(point.all_cpu_s)
        lines.append(
            f"| {point.server} | {s.throughput_rps:.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} "
            f"| {s.errors} | {point.per_request_us(point.engine_cpu_s):.0f} µs "
            f"| {all_us:.0f} µs | {all_us / max(1e-9, echo_us):.2f}x | {busy} |"
        )
    return "\n".join(lines)


def _cpus_text(cpus: frozenset[int] | None) -> str:
    return "any" if not cpus else ",".join(map(str, sorted(cpus)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--frontends", default="1,2,4,8", help="values of --frontends N")
    parser.add_argument("--concurrency", type=int, default=32, help="callers (closed loop)")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=8, help="gRPC connections in all")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per point, untimed")
    parser.add_argument("--echo-runs", type=int, choices=(1, 2), default=2)
    parser.add_argument(
        "--server-cpus", type=cpu_list, default=None,
        help="cores for the servers and their front ends, e.g. 0-9 (default: any)",
    )  # fmt: skip
    parser.add_argument(
        "--client-cpus", type=cpu_list, default=None,
        help="cores for the client processes, e.g. 10-15 (default: any)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.frontends.split(",")]
    own_cpus = os.sched_getaffinity(0)
    if args.server_cpus:  # the echo server, every convoy and its front ends inherit it
        os.sched_setaffinity(0, args.server_cpus)
        # Clients would inherit it too: unless told otherwise, they keep what we had.
        args.client_cpus = args.client_cpus or frozenset(own_cpus)
    try:
        _sweep(args, counts)
    finally:
        os.sched_setaffinity(0, own_cpus)


def _sweep(args: argparse.Namespace, counts: list[int]) -> None:
    examples = ensure_examples(default_examples_dir())
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as tmp:
        link_model(examples / MODEL, Path(tmp) / MODEL)
        echo, echo_url = start_echo()
        try:
            payload = b""
            for n in counts:
                server = start_convoy(Path(tmp), "--frontends", str(n), "--http-port", "-1")
                try:
                    if not payload:  # the same request for every server, the echo's too
                        payload = build_request(server.url, MODEL, 1)
                        label = "echo (before)" if args.echo_runs == 2 else "echo"
                        points.append(measure(label, 0, echo.pid, echo_url, payload, args))
                    name = f"`--frontends {n}`" + (" (one process)" if n == 1 else "")
                    points.append(measure(name, n, server.proc.pid, server.url, payload, args))
                finally:
                    server.stop()
            if args.echo_runs == 2:
                points.append(measure("echo (after)", 0, echo.pid, echo_url, payload, args))
        finally:
            echo.terminate()
            echo.wait(30)
    pinned = (
        f"; servers on cores {_cpus_text(args.server_cpus)}, "
        f"clients on {_cpus_text(args.client_cpus)}"
        if args.server_cpus or args.client_cpus
        else ""
    )
    print(
        f"{MODEL}, closed loop, c={args.concurrency} over {args.procs} client processes and "
        f'{args.connections} connections, {args.duration:g} s per point; "vs echo": against '
        f"the mean of the echo server's {args.echo_runs} run(s){pinned}"
    )
    print(table(points))
    for point in points:
        if point.frontends > 1 and point.requests:
            loop_us = point.per_request_us(point.loop_cpu_s)
            print(
                f"{point.server}: the engine's event-loop thread spent {loop_us:.0f} µs per "
                f"request: on a core of its own it bounds the engine near "
                f"{1e6 / max(loop_us, 1e-9):.0f} req/s"
            )
        if point.frontend_cpu_s:
            shares = ", ".join(f"{point.per_request_us(cpu):.0f}" for cpu in point.frontend_cpu_s)
            print(f"{point.server}: each front end's CPU per request (µs): {shares}")
        if point.changes:
            print(f"{point.server}: server processes changed during the interval: {point.changes}")
        if point.loop.first_error:
            print(f"{point.server}: first error: {point.loop.first_error}")


if __name__ == "__main__":
    main()
