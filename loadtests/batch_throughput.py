"""`convoy batch` throughput against the bare model on the same rows, and through --server.

    python -m loadtests.batch_throughput --rows 2048 --models image_classifier,minilm_embedding

For each model, on one Parquet file of --rows rows:
- bare: the model's backend loaded as Convoy loads it (loadtests.bare), called in a loop at
  its max_batch_size over the file's rows: the compute ceiling;
- in-process: `convoy batch MODEL --input FILE` in a subprocess (its rows/s over scoring,
  the model's load excluded; its peak RSS from the kernel);
- server: `convoy batch MODEL --server URL` against `convoy serve` on the examples, at the
  job's default concurrency cap.
Prints rows/s and each ratio to bare (target for in-process: >= 0.9).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from convoy.backends import load_backend
from convoy.backends.base import default_threads
from loadtests.bare import load_spec
from loadtests.launch import ROOT, start_convoy

TEXTS = (
    "Convoy batches concurrent requests into micro-batches under a latency budget.",
    "A nightly job re-scores the whole table with the new version.",
    "Short text.",
    "Embedding a corpus of support tickets, one paragraph at a time, for search.",
)


def write_input(model: str, rows: int, path: Path) -> dict[str, np.ndarray]:
    """The rows as a Parquet file, and as the arrays the bare model is fed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    if model == "minilm_embedding":
        texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(rows)]
        pq.write_table(pa.table({"TEXT": texts}), path)
        return {"TEXT": np.array([[t.encode()] for t in texts], dtype=object)}
    spec = load_spec(examples() / model)
    [tensor] = spec.inputs
    values = rng.random((rows, *tensor.dims)).astype(np.float32)
    size = int(np.prod(tensor.dims))
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size)
    pq.write_table(pa.table({tensor.name: column}), path, row_group_size=1024)
    return {tensor.name: values}


def examples() -> Path:
    from convoy.repository.examples import default_examples_dir, ensure_examples

    return ensure_examples(default_examples_dir())


def bare(model: str, inputs: dict[str, np.ndarray]) -> float:
    """Rows/s of the backend alone at max_batch_size over the same rows (one warm-up)."""
    model_dir = examples() / model
    spec = load_spec(model_dir)
    version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    instances = sum(g.count for g in spec.instance_groups)
    backend = load_backend(
        spec, model_dir / str(version) / spec.default_model_filename, "cpu",
        default_threads(instances),
    )  # fmt: skip
    outputs = [t.name for t in spec.outputs]
    rows = len(next(iter(inputs.values())))
    step = spec.max_batch_size
    if spec.options.text is not None:  # the tokenizer takes text, as the server decodes it
        inputs = {
            k: np.vectorize(lambda b: b.decode(), otypes=[object])(v) for k, v in inputs.items()
        }
    backend.run({k: v[:step] for k, v in inputs.items()}, outputs)
    start = time.perf_counter()
    for i in range(0, rows, step):
        backend.run({k: v[i : i + step] for k, v in inputs.items()}, outputs)
    seconds = time.perf_counter() - start
    backend.close()
    return rows / seconds


def job(model: str, source: Path, output: Path, *extra: str) -> dict[str, Any]:
    """One `convoy batch` in this process (as the command line runs it): its summary."""
    from convoy.batch.cli import run_batch
    from convoy.cli import build_parser

    shutil.rmtree(output, ignore_errors=True)
    out, err = io.StringIO(), io.StringIO()
    argv = ["batch", model, "--input", str(source), "--output", str(output), *extra]
    if run_batch(build_parser().parse_args(argv), out, err) != 0:
        raise SystemExit(f"convoy batch failed: {err.getvalue()}")
    summary: dict[str, Any] = json.loads(out.getvalue().strip().splitlines()[-1])
    return summary


def peak_rss(model: str, source: Path, output: Path) -> float:
    """The peak RSS (MiB) of `convoy batch` in a process of its own."""
    shutil.rmtree(output, ignore_errors=True)
    code = (
        "import resource, sys; from convoy.cli import main; "
        f"main(['batch', {model!r}, '--input', {str(source)!r}, '--output', {str(output)!r}]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="bare and batch alternate")
    parser.add_argument("--models", default="image_classifier,minilm_embedding")
    parser.add_argument("--no-server", action="store_true", help="skip the --server figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        server = None if args.no_server else start_convoy(examples())
        try:
            for model in args.models.split(","):
                source = work / f"{model}.parquet"
                inputs = write_input(model, args.rows, source)
                ratios, remote_ratios = [], []
                for r in range(args.rounds):
                    ceiling = bare(model, inputs)
                    local = job(model, source, work / "local")["rows_per_s"]
                    ratios.append(local / ceiling)
                    line = (
                        f"{model} round {r + 1}: bare {ceiling:.1f} rows/s, in-process "
                        f"{local:.1f} rows/s (x{local / ceiling:.3f})"
                    )
                    if server is not None:
                        remote = job(model, source, work / "remote", "--server", server.url)
                        remote_ratios.append(remote["rows_per_s"] / ceiling)
                        line += (
                            f", --server {remote['rows_per_s']:.1f} rows/s "
                            f"(x{remote['rows_per_s'] / ceiling:.3f})"
                        )
                    print(line, flush=True)
                summary = f"{model}: in-process / bare median x{statistics.median(ratios):.3f} "
                summary += f"[{min(ratios):.3f}..{max(ratios):.3f}]"
                if remote_ratios:
                    summary += f", --server / bare median x{statistics.median(remote_ratios):.3f}"
                rss = peak_rss(model, source, work / "rss")
                print(
                    f"{summary}; peak RSS of a job on {args.rows} rows: {rss:.0f} MiB", flush=True
                )
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
