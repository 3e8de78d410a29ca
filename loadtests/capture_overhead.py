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
Printed per model: req/s, p50 and p99 off and on and their ratios (target: throughput
on/off >= 0.95), the server's CPU per request from /proc, and the rows the capture wrote
and dropped (every answered request should be a row).
"""

from __future__ import annotations

import argparse
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


def capture_written(server: ConvoyProcess) -> str:
    """What the captured server wrote and dropped by now (the rest is written at SIGTERM)."""
    rows, dropped = capture_counts(server.metrics_port).values()
    return f"capture: {rows:.0f} rows written, {dropped:.0f} dropped before SIGTERM; "


def start_servers(root: Path, flags: list[str], aa: bool) -> dict[bool, ConvoyProcess]:
    """{captured: server}: two repositories, the second with capture on both models
    (`aa`: not, and the second server as the first)."""
    plain = make_repository(root / "off", examples())
    captured = make_repository(root / "on", examples())
    for model in CONCURRENCY:
        config = captured / model / "config.pbtxt"
        config.write_text(config.read_text() + ("" if aa else CAPTURE))
    if not aa:
        flags = ["--capture-dir", str(root / "capture"), *flags]
    servers = {False: start_convoy(plain)}
    try:
        servers[True] = start_convoy(captured, *flags)
    except BaseException:
        servers[False].stop()
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
    parser.add_argument("--models", nargs="+", choices=list(CONCURRENCY), default=list(CONCURRENCY))
    args = parser.parse_args(argv)
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="convoy-capture-overhead-") as tmp:
        servers = start_servers(Path(tmp), args.server_args.split(), args.aa)
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
            written = "" if args.aa else capture_written(servers[True])
        finally:
            for server in servers.values():
                server.stop()
    sides = "second / first server, both without capture (A/A)" if args.aa else "on / off"
    print(
        f"\n{written}{sides}, {args.duration:g} s slices, median [range] over {args.pairs} pairs:"
    )
    for model in args.models:
        print(summarise(model, measurements))


if __name__ == "__main__":
    main()
