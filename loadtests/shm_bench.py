"""Triton's system shared-memory extension against raw_input_contents, one server, one run.

    python -m loadtests.shm_bench [--duration 5] [--concurrency 8] [--procs 2] [--rounds 2]

The built-in `image_classifier` at batch 8 (a 384 KiB FP32 input and a 31 KiB output per
request). Shared-memory mode: every caller owns one input and one output region, made and
filled with tritonclient's own `tritonclient.utils.shared_memory` and registered with
SystemSharedMemoryRegister; its requests name them through `InferInput.set_shared_memory`
and `InferRequestedOutput.set_shared_memory`, so neither tensor crosses the socket. Raw
mode: the same input in raw_input_contents, the logits back in raw_output_contents.

Before timing, every caller's shared-memory request and the raw request are answered once
each and their logits compared. Then a closed loop from client processes (pre-serialised
requests on grpc.aio, responses not parsed: the client stays cheap, so the server is what
is measured), the modes alternating order each round; server CPU seconds per request come
from /proc (the server runs with `--frontends 1`: one process).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2

from convoy.repository.examples import default_examples_dir, ensure_examples

from .bench import _OPTIONS, _model_infer, _server_batches, _summarise
from .launch import cpu_seconds, link_model, start_convoy

with warnings.catch_warnings():  # tritonclient's shm module imports pkg_resources
    warnings.simplefilter("ignore")
    import tritonclient.utils.shared_memory as shm

MODEL = "image_classifier"
INPUT, OUTPUT = "INPUT", "LOGITS"
OUTPUT_SHAPE_PER_ROW = (1000,)
INPUT_SHAPE_PER_ROW = (3, 64, 64)
# A distinct connection per channel: without it grpc shares one connection between
# channels to the same target opened with the same options.
_OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


# --- closed loop, one pre-serialised request per caller (shared with frontends_sweep) ---


async def _callers(
    url: str, payloads: list[bytes], channels: int, duration: float
) -> tuple[list[float], int, str]:
    """One caller per payload, back to back, spread round-robin over `channels`
    connections; returns latencies, errors and the first error's text."""
    latencies: list[float] = []
    errors = 0
    first_error = ""
    opened = [
        grpc.aio.insecure_channel(url, options=[*_OPTIONS, _OWN_CONNECTION])
        for _ in range(max(1, min(channels, len(payloads))))
    ]
    calls = [_model_infer(channel) for channel in opened]
    stop_at = time.perf_counter() + duration

    async def caller(call: Any, payload: bytes) -> None:
        nonlocal errors, first_error
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call(payload, timeout=60)
            except grpc.aio.AioRpcError as exc:
                errors += 1
                first_error = first_error or f"{exc.code()}: {exc.details()}"
                continue
            latencies.append(time.perf_counter() - start)

    try:
        await asyncio.gather(
            *(caller(calls[i % len(calls)], payload) for i, payload in enumerate(payloads))
        )
    finally:
        for channel in opened:
            await channel.close()
    return latencies, errors, first_error


def _caller_process(
    url: str,
    payloads: list[bytes],
    channels: int,
    duration: float,
    out: Any,
    cpus: frozenset[int] | None = None,
) -> None:
    if cpus:  # clients on cores of their own, away from the server's
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_callers(url, payloads, channels, duration)))


@dataclass
class Loop:
    """What the callers saw over one or more closed-loop runs."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0

    def add(self, other: Loop) -> None:
        self.latencies.extend(other.latencies)
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.seconds += other.seconds


def closed_loop(
    url: str,
    payloads: list[bytes],
    procs: int,
    duration: float,
    channels_per_proc: int = 1,
    cpus: frozenset[int] | None = None,
) -> Loop:
    """Closed loop from `procs` client processes: caller i sends payloads[i] back to back;
    each process spreads its callers over `channels_per_proc` connections; `cpus`, where
    given, are the cores the client processes may run on."""
    ctx = mp.get_context("spawn")  # never fork a process that has used grpc
    out = ctx.Queue()
    shares = [payloads[i::procs] for i in range(max(1, min(procs, len(payloads))))]
    workers = [
        ctx.Process(
            target=_caller_process, args=(url, share, channels_per_proc, duration, out, cpus)
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    loop = Loop(seconds=duration)
    for _ in workers:
        latencies, errors, first_error = out.get(timeout=duration + 120)
        loop.add(Loop(latencies, errors, first_error))
    for worker in workers:
        worker.join()
    return loop


# --- the two modes ---


def _serialise(inputs: list[grpcclient.InferInput], outputs: list[Any]) -> bytes:
    """The ModelInferRequest tritonclient itself would send for these inputs and outputs."""
    request = triton_utils._get_inference_request(
        model_name=MODEL, inputs=inputs, model_version="", request_id="", outputs=outputs,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None,
        parameters=None,
    )  # fmt: skip
    return bytes(request.SerializeToString())


@dataclass
class Regions:
    """Each caller's input and output regions, made with tritonclient's utilities."""

    handles_in: list[Any]
    handles_out: list[Any]
    names: list[str]

    @classmethod
    def create(
        cls, client: grpcclient.InferenceServerClient, images: np.ndarray, callers: int
    ) -> Regions:
        out_bytes = images.shape[0] * int(np.prod(OUTPUT_SHAPE_PER_ROW)) * 4
        regions = cls([], [], [])
        tag = f"convoy_shm_bench_{os.getpid()}"
        try:
            for i in range(callers):
                name_in, name_out = f"{tag}_{i}_in", f"{tag}_{i}_out"
                handle_in = shm.create_shared_memory_region(name_in, f"/{name_in}", images.nbytes)
                regions.handles_in.append(handle_in)
                handle_out = shm.create_shared_memory_region(name_out, f"/{name_out}", out_bytes)
                regions.handles_out.append(handle_out)
                shm.set_shared_memory_region(handle_in, [images])
                client.register_system_shared_memory(name_in, f"/{name_in}", images.nbytes)
                regions.names.append(name_in)
                client.register_system_shared_memory(name_out, f"/{name_out}", out_bytes)
                regions.names.append(name_out)
        except BaseException:
            regions.destroy(client)
            raise
        return regions

    def payloads(self, images: np.ndarray) -> list[bytes]:
        out_bytes = images.shape[0] * int(np.prod(OUTPUT_SHAPE_PER_ROW)) * 4
        payloads = []
        for i in range(len(self.handles_in)):
            tensor = grpcclient.InferInput(INPUT, list(images.shape), "FP32")
            tensor.set_shared_memory(self.names[2 * i], images.nbytes)
            output = grpcclient.InferRequestedOutput(OUTPUT)
            output.set_shared_memory(self.names[2 * i + 1], out_bytes)
            payloads.append(_serialise([tensor], [output]))
        return payloads

    def destroy(self, client: grpcclient.InferenceServerClient) -> None:
        for name in self.names:
            try:
                client.unregister_system_shared_memory(name)
            except Exception:  # best effort on the way out
                pass
        for handle in self.handles_in + self.handles_out:
            shm.destroy_shared_memory_region(handle)


def raw_payload(images: np.ndarray) -> bytes:
    tensor = grpcclient.InferInput(INPUT, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return _serialise([tensor], [grpcclient.InferRequestedOutput(OUTPUT)])


def check_agreement(url: str, raw: bytes, shared: list[bytes], regions: Regions) -> float:
    """Send each request once, alone (a batch of its own); the logits from every caller's
    output region must match the raw reply's. Returns the largest absolute difference."""
    with grpc.insecure_channel(url, options=_OPTIONS) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        reply = call(raw, timeout=60)
        shape = [int(d) for d in reply.outputs[0].shape]
        want = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(shape)
        if not np.isfinite(want).all() or not want.any():
            raise SystemExit(f"raw reply's logits look wrong: {want!r}")
        worst = 0.0
        for payload, handle in zip(shared, regions.handles_out, strict=True):
            answer = call(payload, timeout=60)
            # An empty raw_output_contents entry per output keeps the indices aligned.
            if any(answer.raw_output_contents):
                raise SystemExit("shared-memory output came back on the wire")
            got = shm.get_contents_as_numpy(handle, np.float32, shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            worst = max(worst, float(np.abs(got - want).max()))
    return worst


@dataclass
class ModeResult:
    mode: str
    loop: Loop = field(default_factory=Loop)
    cpu_s: float = 0.0
    rows: int = 0
    batches: int = 0

    @property
    def requests(self) -> int:
        return len(self.loop.latencies)

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(1, self.requests)

    def summary(self, batch: int, concurrency: int) -> Any:
        return _summarise(
            self.mode, concurrency, batch, self.loop.latencies, self.loop.errors,
            self.loop.seconds, self.loop.seconds, self.rows / max(1, self.batches),
        )  # fmt: skip


def measure(
    result: ModeResult, pid: int, url: str, payloads: list[bytes], procs: int, duration: float
) -> None:
    rows0, batches0 = _server_batches(url, MODEL)
    before = cpu_seconds(pid)
    loop = closed_loop(url, payloads, procs, duration)
    result.cpu_s += cpu_seconds(pid) - before
    rows1, batches1 = _server_batches(url, MODEL)
    result.loop.add(loop)
    result.rows += rows1 - rows0
    result.batches += batches1 - batches0


def table(results: list[ModeResult], batch: int, concurrency: int) -> str:
    base = results[0]
    lines = [
        "| mode | req/s | rows/s | p50 ms | p99 ms | rows per model run | errors "
        "| server CPU per request | vs raw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        s = result.summary(batch, concurrency)
        ratio = result.cpu_us_per_request / max(1e-9, base.cpu_us_per_request)
        lines.append(
            f"| {result.mode} | {s.throughput_rps:.1f} | {s.rows_per_s:.0f} | {s.p50_ms:.1f} "
            f"| {s.p99_ms:.1f} | {s.avg_batch_size:.1f} | {s.errors} "
            f"| {result.cpu_us_per_request:.0f} µs | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per mode and round")
    parser.add_argument("--concurrency", type=int, default=8, help="callers (closed loop)")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--batch", type=int, default=8, help="rows per request")
    parser.add_argument("--rounds", type=int, default=2, help="the modes alternate order")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per mode, untimed")
    args = parser.parse_args(argv)

    images = np.random.default_rng(0).random((args.batch, *INPUT_SHAPE_PER_ROW), np.float32)
    examples = ensure_examples(default_examples_dir())
    with tempfile.TemporaryDirectory() as tmp:
        link_model(examples / MODEL, Path(tmp) / MODEL)
        server = start_convoy(Path(tmp), "--frontends", "1")
        client = grpcclient.InferenceServerClient(server.url)
        regions = None
        try:
            regions = Regions.create(client, images, args.concurrency)
            shared = regions.payloads(images)
            raw = raw_payload(images)
            worst = check_agreement(server.url, raw, shared, regions)
            modes = {
                "raw_input_contents": [raw] * args.concurrency,
                "system shared memory": shared,
            }
            results = {mode: ModeResult(mode) for mode in modes}
            for payloads in modes.values() if args.warmup > 0 else ():  # warm both paths
                closed_loop(server.url, payloads, args.procs, args.warmup)
            for round_ in range(args.rounds):
                order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
                for mode in order:
                    measure(
                        results[mode], server.proc.pid, server.url, modes[mode], args.procs,
                        args.duration,
                    )  # fmt: skip
        finally:
            if regions is not None:
                regions.destroy(client)
            client.close()
            server.stop()
    print(
        f"{MODEL}, batch {args.batch} ({images.nbytes // 1024} KiB in), closed loop, "
        f"c={args.concurrency} over {args.procs} client processes, {args.rounds} round(s) of "
        f"{args.duration:g} s per mode; answers agree (max |raw - shm| = {worst:.2g} over "
        f"{args.concurrency} callers' regions)"
    )
    print(table(list(results.values()), args.batch, args.concurrency))
    for result in results.values():
        if result.loop.first_error:
            print(f"{result.mode}: first error: {result.loop.first_error}")


if __name__ == "__main__":
    main()
