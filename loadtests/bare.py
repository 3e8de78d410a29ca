"""The compute ceiling: a model's own throughput, called in a loop without a server.

    python -m loadtests.bare --model-dir ~/.cache/convoy/examples-v3/tiny --batch 1,8,32

Loads the model exactly as Convoy serves it (same backend class, same thread
count for one instance) and runs random batches for --duration seconds each.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convoy.backends import load_backend
from convoy.backends.base import default_threads
from convoy.config import ModelSpec, read_model_config, validate_model_config

_TEXT = "Convoy batches concurrent requests into micro-batches under a latency budget."


@dataclass
class BareResult:
    model: str
    batch_size: int
    rows_per_s: float
    batches: int


def load_spec(model_dir: Path) -> ModelSpec:
    config = read_model_config(model_dir)
    return validate_model_config(config, str(model_dir / "config.pbtxt"), model_dir.name)


def random_batch(spec: ModelSpec, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = (rows, *(8 if d < 0 else d for d in tensor.dims))
        if tensor.datatype == "BYTES":
            batch[tensor.name] = np.full(shape, _TEXT.encode(), dtype=object)
        else:
            batch[tensor.name] = rng.random(shape).astype(np.float32)
    return batch


def measure(model_dir: Path, batch_sizes: list[int], duration: float) -> list[BareResult]:
    spec = load_spec(model_dir)
    version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    instances = sum(g.count for g in spec.instance_groups)
    backend = load_backend(
        spec,
        model_dir / str(version) / spec.default_model_filename,
        "cpu",
        default_threads(instances),
    )
    outputs = [t.name for t in spec.outputs]
    results = []
    for rows in batch_sizes:
        batch = random_batch(spec, rows)
        backend.run(batch, outputs)  # warm-up
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            backend.run(batch, outputs)
            count += 1
        elapsed = time.perf_counter() - start
        results.append(BareResult(spec.name, rows, count * rows / elapsed, count))
    backend.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--batch", default="1,8,32,64")
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    for r in measure(args.model_dir, [int(b) for b in args.batch.split(",")], args.duration):
        print(f"{r.model:>18} batch {r.batch_size:<4} {r.rows_per_s:10.1f} rows/s (bare)")


if __name__ == "__main__":
    main()
