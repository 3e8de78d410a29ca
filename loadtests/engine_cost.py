"""The engine's event-loop CPU per request from front ends, in-process, without sockets.

    python -m loadtests.engine_cost [--requests 40000] [--concurrency 1,4,8,32] [--rounds 8]

With front ends (`convoy serve --frontends N`), the engine's loop thread must take
every request and send every answer, so its CPU per request bounds what one engine
serves on a host with cores to spare (docs/benchmarks.md). On a 2-core machine the
sweep's figure for it carries the front ends' and clients' contention. Here the same
path runs alone: the messages a front end would send are handed to the engine's
`EngineLink` directly, and its answers are taken from its outbox instead of a
socket; in between, all of it is the server's own (routing, decode, the tiny model's
queue and instance thread, statistics, encode, the wire format). A closed loop of
`--concurrency` callers; the loop thread's CPU (`time.thread_time`) per request for
each of `--rounds` rounds, the fastest and the median. ZeroMQ's own costs (~3 µs of
Python per message each way) and the kernel's are not in it.

From two concurrencies, the cost splits into a part per batch and a part per
request (batches form from the callers waiting, so at concurrency c they hold about
c requests): what the loop pays per model run and what it pays per caller.

The CPU figures move 15-25 % between runs on a shared machine; one more round at
each concurrency counts the function calls the loop thread makes per request
(Python and C, from `sys.setprofile`), a figure that does not depend on the
machine, to compare changes by.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvloop

from convoy.app import ConvoyServer
from convoy.config import ServerConfig
from convoy.pb import grpc_service_pb2 as pb
from convoy.repository.examples import default_examples_dir, ensure_examples
from convoy.statistics import ModelStatistics
from convoy.workers.engine_link import EngineLink
from convoy.workers.wire import OK, encode_header, pack, unpack

from .launch import link_model

MODEL = "tiny"
IDENTITY = b"frontend-0-1-00000000"


@dataclass
class Figures:
    concurrency: int
    cpu_us: list[float]  # the loop thread's CPU per request, per round
    wall_us: list[float]
    rows_per_batch: float
    calls: float  # function calls on the loop thread per request (a counted round)

    @property
    def best(self) -> float:
        return min(self.cpu_us)

    @property
    def median(self) -> float:
        return statistics.median(self.cpu_us)


def _request() -> bytes:
    request = pb.ModelInferRequest(model_name=MODEL, id="1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return request.SerializeToString()


class ClosedLoop:
    """Callers that each send their next request when answered, as front ends would."""

    def __init__(self, payload: bytes) -> None:
        self.link: EngineLink | None = None  # set once the link (which sends to us) exists
        self._payload = payload
        self._header = encode_header(10.0, None)
        self._left = 0
        self._pending = 0
        self._done: asyncio.Event | None = None
        self.errors: list[bytes] = []

    def sent(self, frames: list[bytes]) -> None:
        """The engine's outbox: one message of answers to our front end."""
        for rid, status, body in unpack(frames[1:]):
            self._pending -= 1
            if status[0] != OK:
                self.errors.append(body)
            if self._left > 0:
                self._send(rid)
        if self._pending == 0 and self._done is not None:
            self._done.set()

    def _send(self, rid: bytes) -> None:
        self._left -= 1
        self._pending += 1
        assert self.link is not None
        self.link.received([IDENTITY, *pack([(rid, self._header, self._payload)])])

    async def run(self, concurrency: int, requests: int) -> tuple[float, float]:
        """(loop CPU µs, wall µs) per request over `requests` calls."""
        self._done = asyncio.Event()
        self._left = requests
        cpu, wall = time.thread_time(), time.perf_counter()
        for i in range(min(concurrency, requests)):
            self._send(b"%d" % i)
        await self._done.wait()
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} errors, the first: {self.errors[0]!r}")
        return 1e6 * cpu / requests, 1e6 * wall / requests

    async def count_calls(self, concurrency: int, requests: int) -> float:
        """Function calls (Python and C) on this thread per request over one round."""
        calls = 0

        def profile(frame: object, event: str, arg: object) -> None:
            nonlocal calls
            if event == "call" or event == "c_call":
                calls += 1

        sys.setprofile(profile)
        try:
            await self.run(concurrency, requests)
        finally:
            sys.setprofile(None)
        return calls / requests


async def measure(concurrencies: list[int], requests: int, rounds: int) -> list[Figures]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        link_model(ensure_examples(default_examples_dir()) / MODEL, root / MODEL)
        config = ServerConfig(model_repository=root)
        sys.setswitchinterval(config.gil_switch_interval_s)  # as `convoy serve` sets it
        server = ConvoyServer(config, root)
        await server.repository.load_all()
        if server.heap is not None:
            server.heap.now()
        loop = ClosedLoop(_request())
        link = EngineLink(f"ipc://{tmp}/engine.ipc", server.path.infer, loop.sent)
        loop.link = link
        await link.start()
        model = server.repository.get(MODEL, "")
        try:
            await loop.run(8, 2000)  # warm-up
            results = []
            for concurrency in concurrencies:
                stats = model.stats
                batches, rows = _batches(stats)
                per_round = max(1, requests // rounds)
                runs = [await loop.run(concurrency, per_round) for _ in range(rounds)]
                after_batches, after_rows = _batches(stats)
                calls = await loop.count_calls(concurrency, per_round)
                results.append(
                    Figures(
                        concurrency,
                        [cpu for cpu, _ in runs],
                        [wall for _, wall in runs],
                        (after_rows - rows) / max(1, after_batches - batches),
                        calls,
                    )
                )
            return results
        finally:
            await link.stop(5.0)
            await server.repository.close()


def _batches(stats: ModelStatistics) -> tuple[int, int]:
    """(model runs, rows) so far: Triton's batch statistics, counted per batch size."""
    runs = {rows: s.compute_infer.count for rows, s in stats.batch_stats.items()}
    return sum(runs.values()), sum(rows * count for rows, count in runs.items())


def split(low: Figures, high: Figures) -> tuple[float, float]:
    """(per batch, per request) µs from two points, cost = batch / rows + request."""
    a, b = 1 / low.rows_per_batch, 1 / high.rows_per_batch
    if a == b:
        return 0.0, high.best
    per_batch = (low.best - high.best) / (a - b)
    return per_batch, high.best - per_batch * b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40000, help="per concurrency")
    parser.add_argument("--concurrency", default="1,4,8,32")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = uvloop.run(measure(concurrencies, args.requests, args.rounds))
    print(f"{MODEL}, the engine's loop thread per request, {args.rounds} rounds per point")
    print(
        "| concurrency | rows per batch | loop CPU µs (fastest) | median | wall µs (fastest) "
        "| calls per request |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for f in results:
        print(
            f"| {f.concurrency} | {f.rows_per_batch:.1f} | {f.best:.1f} | {f.median:.1f} "
            f"| {min(f.wall_us):.1f} | {f.calls:.0f} |"
        )
    if len(results) >= 2:
        per_batch, per_request = split(results[0], results[-1])
        print(
            f"split (c={results[0].concurrency} against c={results[-1].concurrency}): "
            f"{per_batch:.0f} µs per batch + {per_request:.1f} µs per request"
        )


if __name__ == "__main__":
    main()
