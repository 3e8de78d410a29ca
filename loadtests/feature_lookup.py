"""What a Feast lookup costs a request: the same model fed its features by the caller
(`baseline`, input F sent) and looked up in Feast's SQLite online store by entity key
(`with_features`, input USER sent), on one server.

    python -m loadtests.feature_lookup [--duration S] [--rounds R]

A real Feast repository (loadtests/feast_repo.py: Parquet offline sources, apply,
materialize into SQLite) sits beside both models. Closed loop at c=1 and c=32 (each
caller one row per request; the model's dynamic batching groups them, so one lookup
serves a whole batch). Printed per concurrency and round: req/s, p50 and p99 of each,
their ratios, the mean batch, and the lookup's own time per batch and per request
(convoy_feature_lookup_seconds over the requests answered meanwhile).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2

from .bench import Result, run_closed_loop
from .feast_repo import age, build_feature_repo, clicks, expected, score, write_feature_model
from .launch import start_convoy

CONCURRENCY = (1, 32)


def payload(model: str) -> bytes:
    """One row: user 7's key, or user 7's features themselves."""
    request = service_pb2.ModelInferRequest(model_name=model)
    if model == "with_features":
        request.inputs.add(name="USER", datatype="INT64", shape=[1, 1])
        request.raw_input_contents.append(np.array([[7]], np.int64).tobytes())
    else:
        request.inputs.add(name="F", datatype="FP32", shape=[1, 3])
        # What the store holds for user 7 (an hour old): the same answer either way.
        features = np.array([[age(7, 1), score(7, 1), clicks(7, 1)]], np.float32)
        assert float((features * [1, 10, 100]).sum()) == expected(7)
        request.raw_input_contents.append(features.tobytes())
    return bytes(request.SerializeToString())


def lookup_totals(metrics_port: int | None) -> tuple[float, float]:
    """convoy_feature_lookup_seconds sum and count of with_features."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    found = {"sum": 0.0, "count": 0.0}
    for line in lines:
        for part in found:
            if line.startswith(f'convoy_feature_lookup_seconds_{part}{{model="with_features"}}'):
                found[part] = float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


def write_baseline(models: Path) -> None:
    """The same model.py and batching, its input F sent by the caller."""
    source = models / "with_features"
    target = models / "baseline"
    (target / "1").mkdir(parents=True)
    (target / "1" / "model.py").write_text((source / "1" / "model.py").read_text())
    config = (source / "config.pbtxt").read_text()
    start = config.index("parameters [")
    end = config.index("]\n", start) + 2
    (target / "config.pbtxt").write_text(
        config[:start].replace('"with_features"', '"baseline"') + config[end:]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument(
        "--queue-delay-us", type=int, default=1000, help="both models' max_queue_delay"
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="convoy-features-"))
    repo = build_feature_repo(root / "feast")
    models = root / "models"
    write_feature_model(
        models, "with_features", repo.root, max_batch_size=32, queue_delay_us=args.queue_delay_us
    )
    write_baseline(models)
    server = start_convoy(models)
    ratios: dict[int, list[tuple[float, float, float]]] = {c: [] for c in CONCURRENCY}
    try:
        for round_ in range(args.rounds):
            for concurrency in CONCURRENCY:
                order = ("baseline", "with_features")
                if round_ % 2:
                    order = order[::-1]  # alternate which goes first
                results: dict[str, Result] = {}
                per_request = per_batch = 0.0
                for model in order:
                    body = payload(model)
                    run_closed_loop(server.url, model, concurrency, args.warmup, args.procs,
                                    warmup=0, payload=body)  # fmt: skip
                    before = lookup_totals(server.metrics_port)
                    results[model] = run_closed_loop(server.url, model, concurrency,
                                                     args.duration, args.procs, warmup=0,
                                                     payload=body)  # fmt: skip
                    after = lookup_totals(server.metrics_port)
                    if model == "with_features":
                        spent, batches = after[0] - before[0], after[1] - before[1]
                        per_batch = spent / max(batches, 1)
                        per_request = spent / max(results[model].requests, 1)
                base, feat = results["baseline"], results["with_features"]
                for result in (base, feat):
                    print(f"  round {round_ + 1}: {result.line()}", flush=True)
                ratio = (
                    feat.throughput_rps / max(base.throughput_rps, 1e-9),
                    feat.p50_ms / max(base.p50_ms, 1e-9),
                    feat.p99_ms / max(base.p99_ms, 1e-9),
                )
                ratios[concurrency].append(ratio)
                print(
                    f"  round {round_ + 1} c={concurrency}: with/without lookup: throughput "
                    f"x{ratio[0]:.3f}, p50 x{ratio[1]:.2f}, p99 x{ratio[2]:.2f} "
                    f"({base.p99_ms:.2f} -> {feat.p99_ms:.2f} ms); lookup "
                    f"{per_batch * 1e3:.3f} ms per batch (mean batch {feat.avg_batch_size:.1f}), "
                    f"{per_request * 1e3:.3f} ms per request",
                    flush=True,
                )
    finally:
        server.stop()
    for concurrency, values in ratios.items():
        medians = [statistics.median(v[i] for v in values) for i in range(3)]
        print(
            f"c={concurrency}: median with/without lookup: throughput x{medians[0]:.3f}, "
            f"p50 x{medians[1]:.2f}, p99 x{medians[2]:.2f}"
        )


if __name__ == "__main__":
    main()
