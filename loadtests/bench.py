"""Load generator for any KServe v2 gRPC server (Convoy, Triton, ...).

    python -m loadtests.bench --url 127.0.0.1:8001 --model tiny --concurrency 1,32 --duration 10
    python -m loadtests.bench --url 127.0.0.1:8001 --model tiny --rate 200,400,800 \\
        --csv out.csv --json out.json --plot out.png

Closed loop (--concurrency: N callers back to back) or open loop (--rate:
Poisson arrivals at a fixed offered rate; latency counts from the scheduled
send time, so queueing delay is not hidden). Several client processes
(--procs), each an asyncio loop with pre-serialised requests on a raw grpc.aio
channel, so the client costs as little as possible and the server is what is
measured. Inputs are random data shaped from the model's metadata.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
]
_SAMPLE_TEXT = b"Convoy batches concurrent requests into micro-batches under a latency budget."


@dataclass
class Result:
    model: str
    concurrency: int
    rows_per_request: int
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    avg_batch_size: float  # from the server's statistics, 0 if unavailable

    def line(self) -> str:
        return (
            f"{self.model:>18} c={self.concurrency:<4} {self.throughput_rps:9.1f} req/s "
            f"{self.rows_per_s:9.1f} rows/s  p50 {self.p50_ms:7.2f} ms  p90 {self.p90_ms:7.2f}  "
            f"p99 {self.p99_ms:7.2f}  p99.9 {self.p999_ms:7.2f}  batch {self.avg_batch_size:5.2f}"
            f"  errors {self.errors}"
        )


def build_request(url: str, model: str, rows: int, seed: int = 0) -> bytes:
    """A ModelInferRequest for `model` with random inputs, serialised once."""
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=30)
        config = stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=30).config
    rng = np.random.default_rng(seed)
    request = service_pb2.ModelInferRequest(model_name=model)
    for tensor in meta.inputs:
        shape = [int(d) for d in tensor.shape]
        if config.max_batch_size > 0:
            shape[0] = rows
        shape = [8 if d < 0 else d for d in shape]  # variable dims: a fixed 8
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        count = int(np.prod(shape))
        if tensor.datatype == "BYTES":
            item = len(_SAMPLE_TEXT).to_bytes(4, "little") + _SAMPLE_TEXT
            request.raw_input_contents.append(item * count)
        else:
            data = rng.random(count).astype(_NUMPY[tensor.datatype])
            request.raw_input_contents.append(data.tobytes())
    return request.SerializeToString()


def _model_infer(channel: grpc.aio.Channel) -> Any:
    """ModelInfer on raw bytes: requests are serialised once, responses never parsed."""
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,
        response_deserializer=None,
    )


async def _open_loop_client(
    url: str, payload: bytes, rate: float, duration: float, seed: int
) -> tuple[list[float], int]:
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    errors = 0
    max_outstanding = 10_000  # bounded memory: beyond it, arrivals count as errors
    async with grpc.aio.insecure_channel(url, options=_OPTIONS) as channel:
        call = _model_infer(channel)
        outstanding: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                await call(payload, timeout=60)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            latencies.append(time.perf_counter() - scheduled)

        start = time.perf_counter()
        next_at = start
        while True:
            next_at += rng.exponential(1.0 / rate)
            if next_at >= start + duration:
                break
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(outstanding) >= max_outstanding:
                errors += 1
                continue
            task = asyncio.get_running_loop().create_task(one(next_at))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        if outstanding:
            await asyncio.gather(*outstanding)
    return latencies, errors


async def _http_client(
    url: str, body: bytes, concurrency: int, duration: float, header_length: int | None = None
) -> tuple[list[float], int]:
    """Closed loop over HTTP/1.1 keep-alive, one connection per caller: for peers that
    speak only HTTP (Ray Serve, LitServe), and KServe v2 REST. `url` is
    http://host:port/path; `header_length` marks a body in Triton's binary tensor
    extension (a JSON header of that many bytes, then the raw tensors)."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    kind = "application/json"
    extra = ""
    if header_length is not None:
        kind = "application/octet-stream"
        extra = f"Inference-Header-Content-Length: {header_length}\r\n"
    head = (
        f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: {kind}\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                writer.write(head + body)
                status = await reader.readline()
                length, chunked = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    lower = line.lower()
                    if lower.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    elif lower.startswith(b"transfer-encoding:") and b"chunked" in lower:
                        chunked = True
                if chunked:
                    while size := int((await reader.readline()).strip() or b"0", 16):
                        await reader.readexactly(size + 2)
                    await reader.readline()
                else:
                    await reader.readexactly(length)
                if b" 200 " not in status:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
        except (ConnectionError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def _client(
    url: str, payload: bytes, concurrency: int, duration: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(url, options=_OPTIONS) as channel:
        call = _model_infer(channel)
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    await call(payload, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def _process(args: tuple[Any, ...], out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args[0].startswith("http://"):  # url, body, concurrency, duration[, header length]
        out.put(asyncio.run(_http_client(*args)))
    elif len(args) == 5:  # open loop: url, payload, rate, duration, seed
        out.put(asyncio.run(_open_loop_client(*args)))
    else:
        out.put(asyncio.run(_client(*args)))


def _server_batches(url: str, model: str) -> tuple[int, int]:
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model), timeout=10)
        except grpc.RpcError:
            return 0, 0
    rows = sum(s.inference_count for s in stats.model_stats)
    batches = sum(s.execution_count for s in stats.model_stats)
    return rows, batches


def _shares(concurrency: int, procs: int) -> list[int]:
    """Concurrency split over client processes as evenly as possible."""
    procs = max(1, min(procs, concurrency))
    return [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]


def _mean_batch(rows0: int, batches0: int, rows1: int, batches1: int) -> float:
    return (rows1 - rows0) / (batches1 - batches0) if batches1 > batches0 else 0.0


def _summarise(
    name: str, level: int, rows: int, latencies: list[float], errors: int, duration: float,
    elapsed: float, mean_batch: float,
) -> Result:  # fmt: skip
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    count = len(latencies)
    return Result(
        model=name,
        concurrency=level,
        rows_per_request=rows,
        requests=count,
        errors=errors,
        seconds=elapsed,
        throughput_rps=count / duration,
        rows_per_s=count * rows / duration,
        p50_ms=float(np.percentile(lat, 50)),
        p90_ms=float(np.percentile(lat, 90)),
        p99_ms=float(np.percentile(lat, 99)),
        p999_ms=float(np.percentile(lat, 99.9)),
        avg_batch_size=mean_batch,
    )


def run_closed_loop(
    url: str, model: str, concurrency: int, duration: float, procs: int = 2, rows: int = 1,
    warmup: float = 1.0, metadata_url: str | None = None, payload: bytes | None = None,
) -> Result:  # fmt: skip
    if payload is None:
        payload = build_request(metadata_url or url, model, rows)
    shares = _shares(concurrency, procs)
    ctx = mp.get_context("spawn")
    if warmup > 0:
        _run_processes(ctx, url, payload, shares, warmup)
    rows0, batches0 = _server_batches(url, model)
    start = time.perf_counter()
    latencies, errors = _run_processes(ctx, url, payload, shares, duration)
    elapsed = time.perf_counter() - start
    rows1, batches1 = _server_batches(url, model)
    return _summarise(model, concurrency, rows, latencies, errors, duration, elapsed,
                      _mean_batch(rows0, batches0, rows1, batches1))  # fmt: skip


def _run_processes(  # type: ignore[no-untyped-def]
    ctx,
    url: str,
    payload: bytes,
    shares: list[Any],
    duration: float,
    open_loop: bool = False,
    extra: tuple[Any, ...] = (),
):
    out = ctx.Queue()
    workers = []
    for i, share in enumerate(shares):
        args = (url, payload, share, duration, i) if open_loop else (url, payload, share, duration)
        args += extra
        workers.append(ctx.Process(target=_process, args=(args, out)))
    for w in workers:
        w.start()
    latencies: list[float] = []
    errors = 0
    for _ in workers:
        lat, err = out.get(timeout=duration + 120)
        latencies.extend(lat)
        errors += err
    for w in workers:
        w.join()
    return latencies, errors


def open_loop_samples(
    url: str, payload: bytes, rate: float, duration: float, procs: int = 2
) -> tuple[list[float], int]:
    """Each latency (seconds) and the error count of a fixed offered load: for a caller
    that pools the samples of several runs before taking percentiles."""
    ctx = mp.get_context("spawn")
    latencies, errors = _run_processes(
        ctx, url, payload, [rate / procs] * procs, duration, open_loop=True
    )
    return latencies, errors


def run_open_loop(
    url: str, model: str, rate: float, duration: float, procs: int = 2, rows: int = 1,
    metadata_url: str | None = None,
) -> Result:  # fmt: skip
    """Fixed offered load; the result's `concurrency` field holds the offered req/s."""
    payload = build_request(metadata_url or url, model, rows)
    rows0, batches0 = _server_batches(url, model)
    start = time.perf_counter()
    latencies, errors = open_loop_samples(url, payload, rate, duration, procs)
    elapsed = time.perf_counter() - start
    rows1, batches1 = _server_batches(url, model)
    return _summarise(model, int(rate), rows, latencies, errors, duration, elapsed,
                      _mean_batch(rows0, batches0, rows1, batches1))  # fmt: skip


def run_http_closed_loop(
    url: str,
    body: bytes,
    name: str,
    concurrency: int,
    duration: float,
    procs: int = 2,
    header_length: int | None = None,
) -> Result:
    """Closed loop against an HTTP endpoint (http://host:port/path); JSON, or Triton's
    binary tensor extension with `header_length`."""
    shares = _shares(concurrency, procs)
    ctx = mp.get_context("spawn")
    extra = () if header_length is None else (header_length,)
    _run_processes(ctx, url, body, shares, 1.0, extra=extra)  # warm-up
    start = time.perf_counter()
    latencies, errors = _run_processes(ctx, url, body, shares, duration, extra=extra)
    elapsed = time.perf_counter() - start
    return _summarise(name, concurrency, 1, latencies, errors, duration, elapsed, 0.0)


def write_csv(results: list[Result], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


def plot(results: list[Result], path: str, title: str) -> None:
    """Latency against throughput, p50 and p99, one pair of lines per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r.model for r in results):
        points = sorted((r for r in results if r.model == model), key=lambda r: r.throughput_rps)
        x = [r.throughput_rps for r in points]
        ax.plot(x, [r.p50_ms for r in points], marker="o", label=f"{model} p50")
        ax.plot(x, [r.p99_ms for r in points], marker="x", linestyle="--", label=f"{model} p99")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", default="1,8,32,64", help="closed loop sweep")
    parser.add_argument("--rate", default=None, help="open loop instead: offered req/s sweep")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--rows", type=int, default=1, help="batch rows per request")
    parser.add_argument("--json", default=None, help="write results as JSON")
    parser.add_argument("--csv", default=None, help="write results as CSV")
    parser.add_argument("--plot", default=None, help="write a latency-throughput PNG")
    parser.add_argument(
        "--metadata-url",
        default=None,
        help="read the model's metadata from this server instead (for the bare echo server)",
    )
    args = parser.parse_args(argv)
    results = []
    if args.rate:
        for rate in (float(x) for x in args.rate.split(",")):
            result = run_open_loop(
                args.url, args.model, rate, args.duration, args.procs, args.rows,
                metadata_url=args.metadata_url,
            )  # fmt: skip
            print(result.line().replace(" c=", " rate="), flush=True)
            results.append(result)
    else:
        for c in (int(x) for x in args.concurrency.split(",")):
            result = run_closed_loop(
                args.url, args.model, c, args.duration, args.procs, args.rows,
                metadata_url=args.metadata_url,
            )  # fmt: skip
            print(result.line(), flush=True)
            results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    if args.csv:
        write_csv(results, args.csv)
    if args.plot:
        mode = "open loop" if args.rate else "closed loop"
        plot(results, args.plot, f"{args.model}, {mode}, {args.procs} client processes")


if __name__ == "__main__":
    main()
