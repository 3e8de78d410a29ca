"""The autoscaling signal, measured: stepped open-loop load against one replica, its
/metrics scraped every second, and what the HPA would ask for.

    python -m loadtests.autoscale_signal                 # about 90 s on 2 cores
    python -m loadtests.autoscale_signal --target 8 --steps 0.25,0.5,1,1.2,0.5,0.1 --p99-ms 100

First a short closed-loop burst measures the replica's capacity; then Poisson arrivals at
each --steps fraction of it for --step-seconds. Every second the table shows, side by side,
the candidate signals as the chart's queries would compute them:
  inflight    convoy_inflight_requests summed over models (instant), and its mean over
              --window seconds: the chart's avg_over_time(...[window]), the HPA's metric
  queue_ms    mean queue time per request in that second: d(convoy_queue_seconds_sum) /
              d(convoy_queue_seconds_count)
  depth       convoy_queue_depth summed (instant)
and the HPA's answer for the windowed in-flight: ceil(1 * value / --target), left at 1
while the ratio is within the HPA's 10% tolerance. A per-step summary adds the client's
p50/p99, and suggests a target: the mean in-flight of the busiest step whose p99 stays
within --p99-ms.

Loopback only; the load is bounded by the step plan and --max-outstanding.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from convoy.pb import grpc_service_pb2 as pb
from loadtests.launch import link_model, start_convoy

INFER = "/inference.GRPCInferenceService/ModelInfer"
HPA_TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance
_SAMPLE = re.compile(r"^(convoy_[a-z_]+)\{([^}]*)\} (\S+)$", re.M)
_INPUTS = {
    "image_classifier": ("INPUT", [3, 64, 64]),
    "tiny": ("INPUT0", [16]),
}


@dataclass
class Scrape:
    t: float
    inflight: float
    depth: float
    queue_sum: float
    queue_count: float


@dataclass
class Second:
    t: int
    offered: float
    answered: int
    inflight: float
    inflight_avg: float
    depth: float
    queue_ms: float
    desired: int


@dataclass
class Step:
    fraction: float
    rate: float
    latencies: list[float] = field(default_factory=list)
    shed: int = 0
    errors: int = 0


def scrape(url: str, model: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=2) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        if f'model="{model}"' in labels:
            sums[name] = sums.get(name, 0.0) + float(value)
    return Scrape(
        time.monotonic(),
        sums.get("convoy_inflight_requests", 0.0),
        sums.get("convoy_queue_depth", 0.0),
        sums.get("convoy_queue_seconds_sum", 0.0),
        sums.get("convoy_queue_seconds_count", 0.0),
    )


def desired_replicas(current: int, value: float, target: float) -> int:
    """The HPA's rule for a Pods metric of AverageValue type."""
    ratio = value / target
    if abs(ratio - 1.0) <= HPA_TOLERANCE:
        return current
    return max(1, math.ceil(current * ratio))


def request_bytes(model: str) -> bytes:
    name, dims = _INPUTS[model]
    data = np.random.default_rng(0).standard_normal([1, *dims]).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=[1, *dims])
    request.raw_input_contents.append(data.tobytes())
    return bytes(request.SerializeToString())


async def capacity(url: str, payload: bytes, concurrency: int, seconds: float) -> float:
    """Requests per second the replica answers with `concurrency` callers back to back."""
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER)
        done = 0
        end = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < end:
                await call(payload, timeout=30)
                done += 1

        start = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return done / (time.monotonic() - start)


async def stepped_load(
    url: str, payload: bytes, steps: list[Step], step_s: float, max_outstanding: int
) -> tuple[float, list[tuple[float, float]]]:
    """Poisson arrivals per step. Returns the start time and (end time, offered rate) of
    each step, for the per-second table."""
    rng = np.random.default_rng(1)
    outstanding = 0
    plan: list[tuple[float, float]] = []
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER)

        async def one(step: Step) -> None:
            nonlocal outstanding
            start = time.monotonic()
            try:
                await call(payload, timeout=30)
                step.latencies.append(time.monotonic() - start)
            except grpc.aio.AioRpcError:
                step.errors += 1
            finally:
                outstanding -= 1

        tasks: set[asyncio.Task[None]] = set()
        t0 = time.monotonic()
        for step in steps:
            end = time.monotonic() + step_s
            plan.append((end, step.rate))
            next_at = time.monotonic()
            while next_at < end:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if outstanding >= max_outstanding:
                    step.shed += 1  # the client's bound, not the server's answer
                else:
                    outstanding += 1
                    task = asyncio.create_task(one(step))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                next_at += rng.exponential(1.0 / step.rate)
        await asyncio.gather(*tasks)
    return t0, plan


@contextmanager
def model_repository(model: str) -> Iterator[Path]:
    """A private repository of one built-in example (files linked, not copied)."""
    from convoy.repository.examples import default_examples_dir, ensure_examples

    examples = ensure_examples(default_examples_dir())
    with tempfile.TemporaryDirectory(prefix="convoy-signal-") as tmp:
        link_model(examples / model, Path(tmp) / model)
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="image_classifier", choices=sorted(_INPUTS))
    parser.add_argument(
        "--steps", default="0.1,0.25,0.4,0.55,0.7,0.9,0.4,0.1", help="fractions of capacity"
    )
    parser.add_argument("--step-seconds", type=float, default=8.0)
    parser.add_argument("--target", type=float, default=16.0, help="in-flight per pod")
    parser.add_argument("--window", type=int, default=5, help="averaging window, seconds")
    parser.add_argument("--p99-ms", type=float, default=250.0, help="latency objective")
    parser.add_argument("--max-outstanding", type=int, default=600)
    args = parser.parse_args(argv)

    with model_repository(args.model) as repository:
        server = start_convoy(repository, "--grace-period", "5")
        try:
            url = server.url
            metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            payload = request_bytes(args.model)
            cap = asyncio.run(capacity(url, payload, concurrency=32, seconds=4.0))
            print(f"{args.model}: capacity {cap:.0f} req/s (32 callers, closed loop)")
            steps = [Step(float(f), max(1.0, float(f) * cap)) for f in args.steps.split(",")]

            scrapes: list[Scrape] = []
            stop = threading.Event()

            def scraper() -> None:
                while not stop.is_set():
                    try:
                        scrapes.append(scrape(metrics_url, args.model))
                    except OSError:
                        pass
                    stop.wait(1.0)

            thread = threading.Thread(target=scraper, daemon=True)
            thread.start()
            t0, plan = asyncio.run(
                stepped_load(url, payload, steps, args.step_seconds, args.max_outstanding)
            )
            time.sleep(2.0)  # the queue empties: the signal must fall back
            stop.set()
            thread.join(timeout=5)
        finally:
            server.stop()

    seconds = table(scrapes, steps, plan, t0, args.window, args.target)
    summary(steps, seconds, plan, t0, args.p99_ms, args.target)
    return 0


def table(
    scrapes: list[Scrape],
    steps: list[Step],
    plan: list[tuple[float, float]],
    t0: float,
    window: int,
    target: float,
) -> list[Second]:
    print(
        f"\n{'t':>4} {'offered':>8} {'answered':>8} {'inflight':>8} {f'avg{window}s':>8} "
        f"{'depth':>6} {'queue_ms':>8} {'desired':>7}   (target {target:g} in flight per pod)"
    )
    rows: list[Second] = []
    recent: list[float] = []
    for prev, cur in itertools.pairwise(scrapes):
        t = cur.t - t0
        if t < 0:
            continue
        offered = next((rate for end, rate in plan if cur.t <= end), 0.0)
        answered = int(cur.queue_count - prev.queue_count)
        queued = cur.queue_count - prev.queue_count
        queue_ms = 1000 * (cur.queue_sum - prev.queue_sum) / queued if queued else 0.0
        recent = [*recent, cur.inflight][-window:]
        avg = statistics.fmean(recent)
        row = Second(
            int(t), offered, answered, cur.inflight, avg, cur.depth, queue_ms,
            desired_replicas(1, avg, target),
        )  # fmt: skip
        rows.append(row)
        print(
            f"{row.t:>4} {row.offered:>8.0f} {row.answered:>8} {row.inflight:>8.0f} "
            f"{row.inflight_avg:>8.1f} {row.depth:>6.0f} {row.queue_ms:>8.1f} {row.desired:>7}"
        )
    return rows


def summary(
    steps: list[Step],
    rows: list[Second],
    plan: list[tuple[float, float]],
    t0: float,
    p99_ms: float,
    target: float,
) -> None:
    print(
        f"\n{'step':>5} {'offered':>8} {'p50_ms':>7} {'p99_ms':>8} {'inflight':>8} "
        f"{'queue_ms':>8} {'desired':>7} {'shed':>5} {'errors':>6}"
    )
    start = 0.0
    best: float | None = None
    for step, (end, _) in zip(steps, plan, strict=True):
        inside = [r for r in rows if start + 1 <= r.t < end - t0]  # skip each step's edge
        start = end - t0
        lat = sorted(step.latencies)
        p50 = 1000 * lat[len(lat) // 2] if lat else math.nan
        p99 = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else math.nan
        inflight = statistics.fmean(r.inflight for r in inside) if inside else math.nan
        queue_ms = statistics.fmean(r.queue_ms for r in inside) if inside else math.nan
        desired = desired_replicas(1, inflight, target) if inside else 0
        if p99 <= p99_ms and (best is None or inflight > best):
            best = inflight
        print(
            f"{step.fraction:>5.2f} {step.rate:>8.0f} {p50:>7.1f} {p99:>8.1f} {inflight:>8.1f} "
            f"{queue_ms:>8.1f} {desired:>7} {step.shed:>5} {step.errors:>6}"
        )
    if best is not None:
        print(
            f"\nbusiest step within p99 {p99_ms:g} ms held {best:.1f} requests in flight: "
            f"a target of about {max(1.0, best):.0f} per pod keeps replicas at that load"
        )


if __name__ == "__main__":
    sys.exit(main())
