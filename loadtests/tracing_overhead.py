"""Served throughput with tracing at 1 % against tracing off, on the same repository.

    python -m loadtests.tracing_overhead [--duration S] [--rounds R] [--rate R]

The built-in `tiny`, closed loop, 32 callers, no traceparent sent. Each round starts
`convoy serve` twice: once as shipped (no `--trace-endpoint`: nothing of OpenTelemetry
imported), once with `--trace-endpoint` to an OTLP/gRPC receiver in this process and
`--trace-sample-rate 0.01` (the decision per request, and for the sampled ones a request,
a queue and a batch span exported by the SDK's thread); rounds alternate which comes
first. Printed: req/s, p50 and p99 off and on and their ratios (target: throughput
on/off >= 0.97), the server's CPU per request from /proc, and the spans received.

The served ratio moves by tens of percent on a shared 2-core machine, so the script first
measures the work itself, in this process, on the thread that would be the event loop's:
what `Tracing.request` adds to an unsampled request (the decision, and one coroutine
frame), and the CPU of a sampled request's spans (request, queue, a batch span of its own,
as the path and the queue make them), exporter thread included (process CPU, flushed).
Then the engine's whole path, as `loadtests.engine_cost` drives it (the front ends' messages
handed to its EngineLink in-process, 32 callers in a closed loop): the loop thread's CPU
per request with tracing off and at the rate, alternating servers, which bounds what one
event loop serves where it is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


def work_per_request(receiver: Receiver, rate: float, n: int = 20_000) -> str:
    """The tracing's own cost per request, in-process (see the module's doc)."""
    from convoy.batching.batch import Batch
    from convoy.batching.queue import BatchOutcome
    from convoy.batching.request import InferRequest
    from convoy.config import TracingConfig
    from convoy.inference.caller import Caller
    from convoy.inference.tracing import open_tracing
    from convoy.pb import grpc_service_pb2 as pb

    tracing = open_tracing(TracingConfig(receiver.endpoint, 0.0), lambda error: "INTERNAL")
    request = pb.ModelInferRequest(model_name=MODEL, id="r")
    model: Any = SimpleNamespace(spec=SimpleNamespace(name=MODEL), version_label="1")
    outcome = BatchOutcome({}, 0, 0, "cpu")

    async def answer(asked: pb.ModelInferRequest, caller: Caller) -> None:
        if caller.span is not None:  # what the path and the queue do for a sampled one
            now = time.monotonic_ns()
            queued = InferRequest("r", {}, (), 1, (), loop.create_future(), arrival_ns=now)
            caller.span.serves(model, queued)
            queued.dispatch_ns, queued.settled = now, True
            tracing.batch_span(MODEL, "1", Batch((queued,), True), [caller.span], outcome, now)

    async def direct(count: int) -> None:
        for _ in range(count):
            await answer(request, Caller("grpc"))

    async def traced(count: int) -> None:
        for _ in range(count):
            await tracing.request(answer, request, Caller("grpc"))  # type: ignore[arg-type]

    loop = asyncio.new_event_loop()
    try:
        figures = {}
        for sampled in (0.0, 1.0):
            tracing.sample_rate = sampled
            # Sampled: in chunks the exporter's queue (2048 spans) holds, each flushed, so
            # the exporter's thread's CPU is counted and no span is dropped.
            chunk, count = (500, n // 10) if sampled else (n, n)
            best = []
            for run in (direct, traced) * 3:
                start, start_loop = time.process_time(), time.thread_time()
                for _ in range(count // chunk):
                    loop.run_until_complete(run(chunk))
                    if run is traced and sampled:
                        tracing._processor.force_flush()
                on_loop = time.thread_time() - start_loop  # less the flush's wait: it sleeps
                every = time.process_time() - start
                best.append((run.__name__, on_loop / count * 1e6, every / count * 1e6))
            figures[sampled] = {
                (name, i): min(b[i] for b in best if b[0] == name)
                for name in ("direct", "traced")
                for i in (1, 2)
            }
    finally:
        loop.close()
        tracing.close()

    def added(sampled: float, i: int) -> float:
        return figures[sampled][("traced", i)] - figures[sampled][("direct", i)]

    unsampled, loop_us, all_us = added(0.0, 1), added(1.0, 1), added(1.0, 2)
    return (
        f"  tracing's work: {unsampled:.2f} µs per unsampled request on the loop; per sampled "
        f"one (3 spans) {loop_us:.0f} µs on the loop, {all_us:.0f} µs of CPU in all (the "
        f"exporter's thread and this script's receiver included); at rate {rate:g}: "
        f"{unsampled * (1 - rate) + loop_us * rate:.2f} µs on the loop per request, "
        f"{unsampled * (1 - rate) + all_us * rate:.2f} µs in all"
    )


async def engine_loop_cpu(
    endpoint: str | None, rate: float, requests: int, rounds: int
) -> list[float]:
    """The engine loop's CPU µs per tiny request, per round (see the module's doc)."""
    from convoy.app import ConvoyServer
    from convoy.config import ServerConfig, TracingConfig
    from convoy.workers.engine_link import EngineLink

    from .engine_cost import ClosedLoop, _request
    from .launch import link_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        link_model(examples() / MODEL, root / MODEL)
        tracing = TracingConfig(endpoint, rate) if endpoint is not None else None
        config = ServerConfig(model_repository=root, tracing=tracing)
        sys.setswitchinterval(config.gil_switch_interval_s)  # as `convoy serve` sets it
        server = ConvoyServer(config, root)
        await server.repository.load_all()
        if server.heap is not None:
            server.heap.now()
        loop = ClosedLoop(_request())
        link = EngineLink(f"ipc://{tmp}/engine.ipc", server.path.infer, loop.sent)
        loop.link = link
        await link.start()
        try:
            await loop.run(8, 2000)  # warm-up
            return [(await loop.run(CONCURRENCY, requests))[0] for _ in range(rounds)]
        finally:
            await link.stop(5.0)
            await server.repository.close()
            if server.tracing is not None:
                await asyncio.to_thread(server.tracing.close)


def engine_loop(receiver: Receiver, rate: float, requests: int, pairs: int) -> str:
    off: list[float] = []
    on: list[float] = []
    for i in range(pairs):
        for traced in (False, True) if i % 2 == 0 else (True, False):
            endpoint = receiver.endpoint if traced else None
            figures = asyncio.run(engine_loop_cpu(endpoint, rate, requests, 5))
            (on if traced else off).extend(figures)
    a, b = statistics.median(off), statistics.median(on)
    return (
        f"  engine loop CPU per request (c={CONCURRENCY}, {pairs} pairs of servers, 5 rounds of "
        f"{requests}): off {a:.1f} µs [{min(off):.1f}..{max(off):.1f}], at {rate:g} "
        f"{b:.1f} µs [{min(on):.1f}..{max(on):.1f}]: x{b / a:.3f}"
    )


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
    parser.add_argument("--engine-requests", type=int, default=4000, help="per engine round")
    parser.add_argument("--engine-pairs", type=int, default=3, help="off/on engine servers")
    args = parser.parse_args(argv)
    measurements: list[Measurement] = []
    with (
        tempfile.TemporaryDirectory(prefix="convoy-tracing-overhead-") as tmp,
        otlp_receiver(keep=False) as receiver,
    ):
        work = work_per_request(receiver, args.rate)
        print(work, flush=True)
        work += "\n" + engine_loop(receiver, args.rate, args.engine_requests, args.engine_pairs)
        print(work.splitlines()[-1], flush=True)
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
    print(work)


if __name__ == "__main__":
    main()
