"""Served throughput with capture at 1.0 against capture off, side by side in one run.

    python -m loadtests.capture_overhead [--pairs N] [--duration S] [--aa]

The built-in `tiny` (closed loop, 32 callers) and `image_classifier` (16 callers). Two
servers run at once, each on its own copy of the repository: one as shipped, one with
`--capture-dir` and `capture_sample_rate: 1` on both models (every request copied on the
loop and written to Parquet by the writer's thread). Only one is loaded at a time: each
pair is a slice on one and then a slice on the other, the order alternating, so a slow
spell of this shared machine falls on both sides of a pair and cancels in its ratio.
(Servers started afresh per measurement, as this tool did before, put minutes between the
two sides of a pair: single ratios then ranged from x0.78 to x1.05 over 4-6 rounds.)

Between slices the servers rest `--settle` s, so that what the captured server still
does for a slice (its conversion each second; image rows are written every second or so,
whenever half the buffer is full) is done before the next slice starts; its CPU per
request counts until then. Small rows are written every 10 s (the server's default
`--capture-flush-secs`), so a flush falls into whichever slice is running then: on both
sides of pairs alike, over many pairs.
`--aa` runs the same with capture off on both servers: what the method itself reads as
a difference between two identical servers (an A/A test), to set the ratios beside.

`--runs R` starts a fresh pair of servers R times, the order of their start-up
alternating. Two server processes differ by themselves for their whole lives (where the
interpreter's allocations and threads happened to land): within one run the same server
was faster in every pair, by 4-15 %, in either direction from one run to the next. One
run's median measures that luck as much as the capture; the median over runs of each
run's median does not.
Printed per model: req/s, p50 and p99 off and on and their ratios (target: throughput
on/off >= 0.95), the server's CPU per request from /proc, and the rows the capture wrote
and dropped (every answered request should be a row).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from .bench import build_request, run_closed_loop
from .launch import ConvoyProcess, cpu_seconds, start_convoy
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


def start_servers(
    root: Path, flags: list[str], aa: bool, captured_first: bool = False
) -> dict[bool, ConvoyProcess]:
    """{captured: server}: two repositories, one with capture on both models (`aa`: not,
    the two servers alike), started one after the other in the order asked."""
    plain = make_repository(root / "off", examples())
    captured = make_repository(root / "on", examples())
    for model in CONCURRENCY:
        config = captured / model / "config.pbtxt"
        config.write_text(config.read_text() + ("" if aa else CAPTURE))
    if not aa:
        flags = ["--capture-dir", str(root / "capture"), *flags]
    folders = {False: (plain, []), True: (captured, flags)}
    servers: dict[bool, ConvoyProcess] = {}
    try:
        for side in (True, False) if captured_first else (False, True):
            folder, its_flags = folders[side]
            servers[side] = start_convoy(folder, *its_flags)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def measure(
    server: ConvoyProcess, captured: bool, model: str, payload: bytes, args: argparse.Namespace
) -> Measurement:
    """One slice of load on one server, then its rest; CPU counted over both."""
    concurrency = CONCURRENCY[model]
    cpu_before = cpu_seconds(server.proc.pid)
    result = run_closed_loop(server.url, model, concurrency, args.duration, args.procs,
                             warmup=0, payload=payload)  # fmt: skip
    time.sleep(args.settle)
    m = Measurement(model, captured, result, cpu_seconds(server.proc.pid) - cpu_before)
    if args.aa:
        side = "second server" if captured else "first server "
    else:
        side = "capture on " if captured else "capture off"
    print(
        f"  {model:>16} c={concurrency:<3} {side} "
        f"{result.throughput_rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
        f"p99 {result.p99_ms:7.2f} ms  server CPU {m.cpu_ms_per_request:6.3f} ms/req  "
        f"errors {result.errors}",
        flush=True,
    )
    return m


def run(
    root: Path, args: argparse.Namespace, captured_first: bool
) -> tuple[list[Measurement], dict[str, float]]:
    """One pair of fresh servers: each model's pairs of slices; and what the capture
    wrote and dropped by the end (before SIGTERM)."""
    measurements: list[Measurement] = []
    servers = start_servers(root, args.server_args.split(), args.aa, captured_first)
    try:
        for model in args.models:
            payload = build_request(servers[False].url, model, rows=1)
            for server in servers.values():
                run_closed_loop(server.url, model, CONCURRENCY[model], args.warmup,
                                args.procs, warmup=0, payload=payload)  # fmt: skip
            for i in range(args.pairs):
                print(f"{model} pair {i + 1}/{args.pairs}", flush=True)
                for captured in (False, True) if i % 2 == 0 else (True, False):
                    measurements.append(measure(servers[captured], captured, model,
                                                payload, args))  # fmt: skip
        counts = (
            {"rows": 0.0, "dropped": 0.0} if args.aa else capture_counts(servers[True].metrics_port)
        )
    finally:
        for server in servers.values():
            server.stop()
    return measurements, counts


def median_ratio(model: str, measurements: list[Measurement], figure: str) -> float:
    """The median over pairs of on/off (`figure`: throughput or cpu)."""
    on = [m for m in measurements if m.model == model and m.monitored]
    off = [m for m in measurements if m.model == model and not m.monitored]

    def value(m: Measurement) -> float:
        return m.result.throughput_rps if figure == "throughput" else m.cpu_ms_per_request

    return statistics.median(value(a) / max(value(b), 1e-9) for a, b in zip(on, off, strict=True))


def across_runs(model: str, runs: list[list[Measurement]]) -> str:
    """The median over runs of each run's median ratio, with the runs' range."""

    def medians(figure: str) -> list[float]:
        return [median_ratio(model, measurements, figure) for measurements in runs]

    def shown(values: list[float]) -> str:
        return f"x{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"

    throughput = medians("throughput")
    verdict = "meets" if statistics.median(throughput) >= 0.95 else "misses"
    return (
        f"  {model:>16}: throughput {shown(throughput)} ({verdict} the 0.95 target)  "
        f"server CPU/request {shown(medians('cpu'))}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per slice")
    parser.add_argument("--pairs", type=int, default=8, help="off/on pairs of slices per model")
    parser.add_argument("--settle", type=float, default=1.5, help="seconds of rest after each")
    parser.add_argument("--server-args", default="", help="more flags of the captured server")
    parser.add_argument("--aa", action="store_true", help="capture off on both (an A/A test)")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per server and model")
    parser.add_argument("--runs", type=int, default=1, help="fresh pairs of servers, one by one")
    parser.add_argument("--models", nargs="+", choices=list(CONCURRENCY), default=list(CONCURRENCY))
    args = parser.parse_args(argv)
    if args.runs < 1 or args.pairs < 1:
        parser.error("--runs and --pairs take 1 or more")
    runs: list[list[Measurement]] = []
    written = dropped = 0.0
    for r in range(args.runs):
        if args.runs > 1:
            print(f"run {r + 1}/{args.runs}", flush=True)
        with tempfile.TemporaryDirectory(prefix="convoy-capture-overhead-") as tmp:
            measurements, counts = run(Path(tmp), args, captured_first=r % 2 == 1)
        runs.append(measurements)
        written, dropped = written + counts["rows"], dropped + counts["dropped"]
        if args.runs > 1:
            print(f"run {r + 1}/{args.runs}, median [range] over its {args.pairs} pairs:")
            for model in args.models:
                print(summarise(model, measurements))
    sides = "second / first server, both without capture (A/A)" if args.aa else "on / off"
    capture = "" if args.aa else (
        f"capture: {written:.0f} rows written, {dropped:.0f} dropped before SIGTERM; "
    )  # fmt: skip
    print(
        f"\n{capture}{sides}, {args.duration:g} s slices, median [range] over "
        f"{args.pairs} pairs{f' of each of {args.runs} runs' if args.runs > 1 else ''}:"
    )
    every = [m for measurements in runs for m in measurements]
    for model in args.models:
        print(summarise(model, every))
    if args.runs > 1:
        print(f"median [range] over {args.runs} runs of each run's median:")
        for model in args.models:
            print(across_runs(model, runs))


if __name__ == "__main__":
    main()
