"""The response cache under a repeated-query workload: a Zipf-distributed request mix.

    python -m loadtests.cache_bench [--duration S] [--zipf 1.1] [--keys N]

Real traffic repeats itself: a few images or queries are asked for often, most rarely.
Each model gets N distinct inputs (seeded random images for the CNN, seeded word
sequences for MiniLM); each caller draws the next one from a Zipf law (key k with
probability proportional to 1/k^s), seeded, so both phases see the same request mix.

One server serves both examples with `response_cache { enable: true }` and
`--cache-config local,size=...`. Per model, closed loop, back to back:

    off: every request carries `response_cache: false` (neither reads nor writes the
         cache: the uncached serving path, on the same warm server)
    on:  the same mix with the cache, starting empty (the misses that fill it count)

Printed: throughput, p50/p99 latency, the hit rate from ModelStatistics (cache_hit /
(cache_hit + cache_miss)) and the repeat ceiling (the share of requests whose input
was already sent in that phase: the best any cache could do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .bench import _OPTIONS, Result, _model_infer, _summarise, build_request
from .launch import ConvoyProcess, start_convoy

MODELS = ("image_classifier", "minilm_embedding")
_WORDS = (
    "red shoes running women size cheap leather boots winter jacket men waterproof "
    "kitchen knife set chef stainless steel phone case wireless charger fast cable "
    "laptop stand desk lamp office chair ergonomic coffee grinder beans espresso "
    "garden hose yoga mat travel backpack hiking tent camping stove"
).split()


@dataclass
class Phase:
    model: str
    cache: str  # off | on
    result: Result
    hit_rate: float  # ModelStatistics: hits / (hits + misses) in this phase
    repeat_ceiling: float  # requests whose input was already sent in this phase
    computed: int  # inference_count delta: rows the model ran

    def line(self) -> str:
        r = self.result
        hits = f"hit rate {self.hit_rate:6.1%} (ceiling {self.repeat_ceiling:6.1%})"
        return (
            f"{self.model:>18} cache {self.cache:<3} {r.throughput_rps:8.1f} req/s  "
            f"p50 {r.p50_ms:8.2f} ms  p99 {r.p99_ms:8.2f} ms  {hits}  "
            f"computed {self.computed:6d}  errors {r.errors}"
        )


def zipf_cdf(keys: int, s: float) -> np.ndarray:
    """The cumulative Zipf law over keys 0..keys-1 (rank 1 is key 0). Finite, so any
    s > 0 is a law (numpy's zipf needs s > 1 and is unbounded)."""
    weights = 1.0 / np.arange(1, keys + 1, dtype=np.float64) ** s
    return np.cumsum(weights / weights.sum())


def draws(cdf: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(np.searchsorted(cdf, rng.random(count)), len(cdf) - 1)


def key_payloads(url: str, model: str, keys: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """N distinct requests, serialised once: with the cache (as sent) and bypassing it."""
    template = service_pb2.ModelInferRequest.FromString(build_request(url, model, 1, seed))
    rng = np.random.default_rng(seed)
    cached: list[bytes] = []
    bypass: list[bytes] = []
    for _ in range(keys):
        request = service_pb2.ModelInferRequest()
        request.CopyFrom(template)
        for i, tensor in enumerate(request.inputs):
            if tensor.datatype == "BYTES":  # a query: a seeded run of shop-search words
                words = rng.choice(_WORDS, size=int(rng.integers(4, 12)))
                text = " ".join(words).encode()
                request.raw_input_contents[i] = len(text).to_bytes(4, "little") + text
            else:
                size = len(request.raw_input_contents[i])
                data = rng.random(size // 4, dtype=np.float32)  # FP32 inputs (the CNN)
                request.raw_input_contents[i] = data.tobytes()
        cached.append(request.SerializeToString())
        request.parameters["response_cache"].bool_param = False
        bypass.append(request.SerializeToString())
    return cached, bypass


async def closed_loop(
    url: str, payloads: Sequence[bytes], sequences: Sequence[np.ndarray], duration: float
) -> tuple[list[float], int, set[int], int]:
    """One caller per sequence, back to back; latencies, errors, keys sent, requests sent."""
    latencies: list[float] = []
    errors = 0
    sent: set[int] = set()
    total = 0
    async with grpc.aio.insecure_channel(url, options=_OPTIONS) as channel:
        call = _model_infer(channel)
        stop_at = time.perf_counter() + duration

        async def caller(sequence: np.ndarray) -> None:
            nonlocal errors, total
            for key in sequence:
                if time.perf_counter() >= stop_at:
                    return
                sent.add(int(key))
                total += 1
                start = time.perf_counter()
                try:
                    await call(payloads[key], timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(caller(s) for s in sequences))
    return latencies, errors, sent, total


def cache_counts(url: str, model: str) -> tuple[int, int, int]:
    """hits, misses and inference_count of the model's versions, from ModelStatistics."""
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model), timeout=10)
    hits = sum(s.inference_stats.cache_hit.count for s in stats.model_stats)
    misses = sum(s.inference_stats.cache_miss.count for s in stats.model_stats)
    return hits, misses, sum(s.inference_count for s in stats.model_stats)


def measure(
    url: str, model: str, cache: str, payloads: Sequence[bytes], sequences: Sequence[np.ndarray],
    duration: float,
) -> Phase:  # fmt: skip
    hits0, misses0, rows0 = cache_counts(url, model)
    start = time.perf_counter()
    latencies, errors, sent, total = asyncio.run(closed_loop(url, payloads, sequences, duration))
    elapsed = time.perf_counter() - start
    hits1, misses1, rows1 = cache_counts(url, model)
    hits, misses = hits1 - hits0, misses1 - misses0
    result = _summarise(
        model, len(sequences), 1, latencies, errors, duration, elapsed, 0.0
    )  # batch size is not the point here
    return Phase(
        model=model,
        cache=cache,
        result=result,
        hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        repeat_ceiling=1 - len(sent) / total if total else 0.0,
        computed=rows1 - rows0,
    )


def make_repository(target: Path, examples: Path, models: Sequence[str]) -> Path:
    """The examples with the cache switch on: configs copied, model files linked."""
    for model in models:
        src, dst = examples / model, target / model
        dst.mkdir(parents=True)
        config = (src / "config.pbtxt").read_text()
        (dst / "config.pbtxt").write_text(config + "response_cache { enable: true }\n")
        for version in (p for p in src.iterdir() if p.is_dir()):
            (dst / version.name).mkdir()
            for f in version.iterdir():
                (dst / version.name / f.name).symlink_to(f)
    return target


def run(args: argparse.Namespace) -> list[Phase]:
    from convoy.repository.examples import default_examples_dir, ensure_examples

    examples = ensure_examples(default_examples_dir())
    root = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    server: ConvoyProcess | None = None
    try:
        repo = make_repository(root, examples, args.models)
        server = start_convoy(repo, "--cache-config", f"local,size={args.cache_size}")
        cdf = zipf_cdf(args.keys, args.zipf)
        phases = []
        for model in args.models:
            cached, bypass = key_payloads(server.url, model, args.keys, args.seed)
            # Each caller its own seeded draws, long enough for any throughput.
            sequences = [draws(cdf, 200_000, args.seed + 1 + i) for i in range(args.concurrency)]
            # Warm the model (first runs allocate) without touching the cache.
            warm = [draws(cdf, 1000, 10_000 + i) for i in range(args.concurrency)]
            asyncio.run(closed_loop(server.url, bypass, warm, args.warmup))
            for cache, payloads in (("off", bypass), ("on", cached)):
                phase = measure(server.url, model, cache, payloads, sequences, args.duration)
                print(phase.line(), flush=True)
                phases.append(phase)
        return phases
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _ratio(on: float, off: float) -> str:
    return f"{on / off:.2f}x" if off > 0 else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s (> 0)")
    parser.add_argument(
        "--keys",
        type=int,
        default=1000,
        help="distinct inputs per model (held serialised twice: the CNN's are 49 KB each)",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="callers, closed loop")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds, cache bypassed")
    parser.add_argument("--cache-size", default="256MiB", help="--cache-config size")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the phases as JSON")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.keys < 1 or args.zipf <= 0 or args.duration <= 0 or args.concurrency < 1:
        parser.error("--keys, --zipf, --duration and --concurrency must be positive")
    print(
        f"Zipf s={args.zipf} over {args.keys} keys, concurrency {args.concurrency}, "
        f"{args.duration:g} s a phase, cache {args.cache_size}",
        flush=True,
    )
    phases = run(args)
    by_model: dict[str, dict[str, Phase]] = {}
    for phase in phases:
        by_model.setdefault(phase.model, {})[phase.cache] = phase
    for model, pair in by_model.items():
        off, on = pair["off"].result, pair["on"].result
        print(
            f"{model:>18} on/off: throughput {_ratio(on.throughput_rps, off.throughput_rps)}, "
            f"p50 {_ratio(on.p50_ms, off.p50_ms)}, p99 {_ratio(on.p99_ms, off.p99_ms)}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(p), "result": asdict(p.result)} for p in phases], f, indent=2)


if __name__ == "__main__":
    main()
