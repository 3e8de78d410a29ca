"""Many models on one small machine: on-demand loading under a memory budget.

    python -m loadtests.on_demand [--copies 30] [--fits 6 12] [--requests 600]
                                  [--duration 120] [--callers 16] [--zipf 1.1]

A repository of `--copies` copies of the example image_classifier (its ~118 MB
model.onnx linked, not copied: each copy is a model of its own to the server) is
served with `--model-control-mode on-demand` and a `--memory-budget-mib` that holds
`fits` of them (each budget a run of its own, on a fresh server). `--callers` closed-loop
callers take the next of `--requests` requests (at most `--duration` seconds), whose
models follow a Zipf law (seeded: every run serves the same sequence), each request one
image whose answer is checked against ONNX Runtime run here.

Printed per run: requests answered, refused (RESOURCE_EXHAUSTED, none expected: a copy
fits the budget alone) and wrong; the server's resident memory sampled from /proc every
100 ms against the budget plus its base (its resident memory before any model loaded);
loads and evictions from its metrics; the cold-start cost from
convoy_model_load_seconds and from the callers' side (latency of requests that waited
for a load); throughput and latency. The runs' load counts are compared at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convoy.procstat import process_usage
from convoy.repository.examples import default_examples_dir, ensure_examples

from .cache_bench import draws, zipf_cdf
from .launch import ConvoyProcess, link_model, start_convoy

MODEL = "image_classifier"
# Run at load, inside its measure: the runtime's arena for a batch of 16 counts too
# (docs/models.md, sizing the budget).
WARMUP = """
model_warmup [ { name: "batch16" batch_size: 16 inputs { key: "INPUT" value {
  data_type: TYPE_FP32 dims: [ 3, 64, 64 ] random_data: true } } } ]
"""
MIB = 1 << 20


@dataclass
class Run:
    fits: int
    budget_mib: int
    base_rss: int = 0
    max_rss: int = 0
    samples: int = 0
    answered: int = 0
    refused: int = 0
    wrong: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)  # code -> its first message
    latencies_ms: list[float] = field(default_factory=list)
    loads: float = 0.0
    evictions: float = 0.0
    load_seconds: list[tuple[float, float]] = field(default_factory=list)  # (le, count)
    load_count: float = 0.0
    load_sum: float = 0.0
    duration_s: float = 0.0

    def report(self) -> str:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        slow = lat[lat > 1000 * _quantile(self.load_seconds, self.load_count, 0.05) / 2]
        over = (self.max_rss - self.base_rss) / MIB
        mean_load = self.load_sum / max(1, self.load_count)
        lines = [
            f"budget {self.budget_mib} MiB (fits {self.fits} copies):",
            f"  requests answered {self.answered}, refused {self.refused}, wrong {self.wrong}, "
            f"other errors {sum(self.failed.values())} {self.failed or ''} {self.messages or ''}",
            f"  resident memory: base {self.base_rss / MIB:.0f} MiB, max {self.max_rss / MIB:.0f} "
            f"MiB = base + {over:.0f} MiB (budget {self.budget_mib}: "
            f"{'within' if over <= self.budget_mib else 'OVER'}), {self.samples} samples",
            f"  loads {self.loads:.0f} ({1000 * self.loads / max(1, self.answered):.0f} per "
            f"1,000 requests), evictions {self.evictions:.0f}, "
            f"{self.answered / self.duration_s:.1f} req/s over {self.duration_s:.0f} s",
            f"  cold start (server, load time): mean {mean_load:.2f} s"
            f", p50 <= {_quantile(self.load_seconds, self.load_count, 0.5):.2f} s, "
            f"p99 <= {_quantile(self.load_seconds, self.load_count, 0.99):.2f} s",
            f"  callers: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms; "
            f"{len(slow)} requests waited for a load: p50 "
            f"{np.percentile(slow, 50) if len(slow) else 0:.0f} ms, p99 "
            f"{np.percentile(slow, 99) if len(slow) else 0:.0f} ms",
        ]
        return "\n".join(lines)


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile q."""
    for le, cumulative in buckets:
        if count and cumulative >= q * count:
            return le
    return math.inf if count else 0.0


def build_repository(root: Path, copies: int) -> Path:
    examples = ensure_examples(default_examples_dir())
    for i in range(copies):
        copy = root / f"{MODEL}_{i:02d}"
        link_model(examples / MODEL, copy)
        config = copy / "config.pbtxt"
        text = config.read_text().replace(f'name: "{MODEL}"', f'name: "{copy.name}"')
        config.write_text(text + WARMUP)
    return root


def sample_rss(pid: int, run: Run, stop: threading.Event) -> None:
    while not stop.wait(0.1):
        usage = process_usage(pid)
        if usage is None:
            return
        run.max_rss = max(run.max_rss, usage[1])
        run.samples += 1


async def caller(
    url: str, models: list[str], order: Iterator[int], images: np.ndarray,
    expected: np.ndarray, until: float, run: Run, seed: int,
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for index in order:  # shared by every caller: the one sequence, in order
            if time.monotonic() >= until:
                return
            model = models[index]
            which = int(rng.integers(len(images)))
            request = service_pb2.ModelInferRequest(model_name=model)
            tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 3, 64, 64])
            del tensor  # the data travels as raw contents
            request.raw_input_contents.append(images[which : which + 1].tobytes())
            start = time.perf_counter()
            try:
                reply = await stub.ModelInfer(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    run.refused += 1
                else:
                    name = exc.code().name
                    run.failed[name] = run.failed.get(name, 0) + 1
                    run.messages.setdefault(name, str(exc.details()))
                continue
            run.latencies_ms.append((time.perf_counter() - start) * 1e3)
            logits = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
            if np.allclose(logits, expected[which], rtol=1e-3, atol=1e-3):
                run.answered += 1
            else:
                run.wrong += 1


def read_metrics(server: ConvoyProcess, run: Run) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "convoy_model_loads_total":
                run.loads += s.value
            elif s.name == "convoy_model_evictions_total":
                run.evictions += s.value
            elif s.name == "convoy_model_load_seconds_bucket":
                run.load_seconds.append((float(s.labels["le"]), s.value))
            elif s.name == "convoy_model_load_seconds_count":
                run.load_count = s.value
            elif s.name == "convoy_model_load_seconds_sum":
                run.load_sum = s.value


def one_run(
    repo: Path, fits: int, model_mib: int, args: argparse.Namespace,
    images: np.ndarray, expected: np.ndarray,
) -> Run:  # fmt: skip
    budget = fits * model_mib + model_mib // 2
    run = Run(fits, budget)
    server = start_convoy(
        repo, "--model-control-mode", "on-demand", "--memory-budget-mib", str(budget),
        "--frontends", "1",
    )  # fmt: skip
    try:
        time.sleep(2.0)  # the start-up heap settle
        usage = process_usage(server.proc.pid)
        assert usage is not None
        run.base_rss = run.max_rss = usage[1]
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server.proc.pid, run, stop))
        sampler.start()
        models = sorted(p.name for p in repo.iterdir() if not p.name.startswith("."))
        order = iter(draws(zipf_cdf(len(models), args.zipf), args.requests, seed=7).tolist())
        until = time.monotonic() + args.duration
        started = time.monotonic()

        async def callers() -> None:
            await asyncio.gather(*(
                caller(server.url, models, order, images, expected, until,
                       run, seed=c)
                for c in range(args.callers)
            ))  # fmt: skip

        asyncio.run(callers())
        run.duration_s = time.monotonic() - started
        stop.set()
        sampler.join()
        read_metrics(server, run)
    finally:
        server.stop()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--fits", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--duration", type=float, default=120.0, help="at most, per run")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument(
        "--model-mib", type=int, default=0,
        help="one copy's measured size (default: its model.onnx's size + 8 MiB)",
    )  # fmt: skip
    args = parser.parse_args()
    import onnxruntime as ort

    examples = ensure_examples(default_examples_dir())
    onnx = examples / MODEL / "1" / "model.onnx"
    model_mib = args.model_mib or (os.path.getsize(onnx) >> 20) + 8
    images = np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"INPUT": images})[0]
    del session
    print(
        f"{args.copies} copies of {MODEL} (~{model_mib} MiB each), {args.callers} callers, "
        f"Zipf s={args.zipf}, {args.requests} requests per run (at most {args.duration:.0f} s), "
        f"{os.cpu_count()} cores"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="convoy-on-demand-") as tmp:
        repo = build_repository(Path(tmp) / "repo", args.copies)
        for fits in args.fits:
            run = one_run(repo, fits, model_mib, args, images, expected)
            print(run.report(), flush=True)
            runs.append(run)
    if len(runs) > 1:
        first = runs[0]
        for other in runs[1:]:
            ratio = other.loads / first.loads if first.loads else float("nan")
            print(
                f"loads with room for {other.fits}: {other.loads:.0f} = {ratio:.2f}x those "
                f"with room for {first.fits} ({first.loads:.0f})"
            )


if __name__ == "__main__":
    main()
