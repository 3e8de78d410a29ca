"""`convoy batch` throughput against the bare model on the same rows, and through --server.

    python -m loadtests.batch_throughput --rows 2048 --models image_classifier,minilm_embedding

For each model, on one Parquet file of --rows rows:
- bare: the model's backend loaded as Convoy loads it (loadtests.bare), called in a loop at
  its max_batch_size over the file's rows: the compute ceiling;
- in-process: `convoy batch`'s engine (BatchJob over the model loaded once, as the command
  runs it; the load is not scored), rounds alternating with the bare model's;
- server: the same job against `convoy serve` on the examples (`--server`), at the job's
  default concurrency cap;
- the peak RSS of a whole `convoy batch` run in a process of its own.
Prints rows/s and CPU ms per row, and each ratio to bare (target for in-process: >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def write_large_input(model: str, gib: float, path: Path) -> int:
    """A Parquet file of about `gib` GiB of random rows, written 1024 rows at a time (the
    writer never holds it whole); its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    [tensor] = load_spec(examples() / model).inputs
    size = int(np.prod(tensor.dims))
    chunk = 1024
    total = max(chunk, int(gib * 2**30 / (4 * size)) // chunk * chunk)
    rng = np.random.default_rng(1)
    schema = pa.schema([(tensor.name, pa.list_(pa.float32(), size))])
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(total // chunk):
            values = pa.array(rng.random(chunk * size, dtype=np.float32))
            column = pa.FixedSizeListArray.from_arrays(values, size)
            writer.write_table(pa.table({tensor.name: column}, schema=schema))
    return total


def examples() -> Path:
    from convoy.repository.examples import default_examples_dir, ensure_examples

    return ensure_examples(default_examples_dir())


@dataclass
class Rate:
    rows_per_s: float
    cpu_ms_per_row: float  # this process's CPU (every thread) per row


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Bare:
    """The backend alone, loaded as Convoy loads it (loadtests.bare), at max_batch_size."""

    def __init__(self, model: str, inputs: dict[str, np.ndarray]) -> None:
        model_dir = examples() / model
        spec = load_spec(model_dir)
        version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        instances = sum(g.count for g in spec.instance_groups)
        self.backend = load_backend(
            spec, model_dir / str(version) / spec.default_model_filename, "cpu",
            default_threads(instances),
        )  # fmt: skip
        self.outputs = [t.name for t in spec.outputs]
        self.step = spec.max_batch_size
        if spec.options.text is not None:  # the tokenizer takes text, as the server decodes it
            decode = np.vectorize(lambda b: b.decode(), otypes=[object])
            inputs = {k: decode(v) for k, v in inputs.items()}
        self.inputs = inputs
        self.backend.run({k: v[: self.step] for k, v in inputs.items()}, self.outputs)  # warm-up

    def measure(self) -> Rate:
        rows = len(next(iter(self.inputs.values())))
        start, cpu = time.perf_counter(), cpu_seconds()
        for i in range(0, rows, self.step):
            self.backend.run(
                {k: v[i : i + self.step] for k, v in self.inputs.items()}, self.outputs
            )
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        return Rate(rows / seconds, 1000 * cpu / rows)


class InProcess:
    """`convoy batch`'s in-process engine, the model loaded once (its load is not scored)."""

    def __init__(self, model: str, source: Path, work: Path, server: str | None = None) -> None:
        from convoy.batch.cli import BatchConfig, make_plan
        from convoy.batch.engine import open_in_process, open_server
        from convoy.batch.job import default_part_rows
        from convoy.batch.source import open_source

        self.loop = asyncio.new_event_loop()
        opened = (
            open_server(server, model, "") if server else open_in_process(examples(), model, "")
        )
        self.scorer, signature = self.loop.run_until_complete(opened)
        self.dataset = open_source(str(source))
        config = BatchConfig(model=model, input=str(source), output=str(work))
        plan = make_plan(config, self.dataset.schema, signature)
        self.plan = dataclasses.replace(plan, part_rows=default_part_rows(plan.batch_size))
        self.signature = signature
        self.work = work
        # One job through the model first: its instances warmed up as the bare one was.
        self.measure()

    def measure(self) -> Rate:
        from convoy.batch.job import BatchJob
        from convoy.batch.sink import Manifest, Sink

        shutil.rmtree(self.work, ignore_errors=True)
        sink = Sink(str(self.work), None, "parquet")
        manifest = Manifest("", self.signature.name, "", self.plan.part_rows, "parquet", None)
        job = BatchJob(self.plan, self.scorer, sink, manifest)
        start, cpu = time.perf_counter(), cpu_seconds()
        progress = self.loop.run_until_complete(job.run(self.dataset))
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        return Rate(progress.rows / seconds, 1000 * cpu / progress.rows)

    def close(self) -> None:
        self.loop.run_until_complete(self.scorer.close())
        self.loop.close()


def peak_rss(model: str, source: Path, output: Path) -> float:
    """The peak RSS (MiB) of `convoy batch` in a process of its own: VmHWM, which starts
    anew at exec (ru_maxrss keeps the forking parent's high-water mark across it)."""
    shutil.rmtree(output, ignore_errors=True)
    code = (
        "import sys; from convoy.cli import main; "
        f"main(['batch', {model!r}, '--input', {str(source)!r}, '--output', {str(output)!r}]); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], "
        "file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("VmHWM")][-1]
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="bare and batch alternate")
    parser.add_argument("--models", default="image_classifier,minilm_embedding")
    parser.add_argument("--no-server", action="store_true", help="skip the --server figures")
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=0.0,
        help="also score an image_classifier input of this many GiB and print the peak RSS",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        server = None if args.no_server else start_convoy(examples())
        try:
            for model in args.models.split(","):
                source = work / f"{model}.parquet"
                ceiling = Bare(model, write_input(model, args.rows, source))
                local = InProcess(model, source, work / "local")
                remote = InProcess(model, source, work / "remote", server.url) if server else None
                ratios, cpu, remote_ratios = [], [], []
                for r in range(args.rounds):
                    base = ceiling.measure()
                    mine = local.measure()
                    ratios.append(mine.rows_per_s / base.rows_per_s)
                    cpu.append(mine.cpu_ms_per_row / base.cpu_ms_per_row)
                    line = (
                        f"{model} round {r + 1}: bare {base.rows_per_s:.1f} rows/s "
                        f"({base.cpu_ms_per_row:.2f} CPU ms/row), in-process "
                        f"{mine.rows_per_s:.1f} rows/s ({mine.cpu_ms_per_row:.2f} CPU ms/row) "
                        f"x{ratios[-1]:.3f}"
                    )
                    if remote is not None:
                        far = remote.measure()
                        remote_ratios.append(far.rows_per_s / base.rows_per_s)
                        line += f", --server {far.rows_per_s:.1f} rows/s x{remote_ratios[-1]:.3f}"
                    print(line, flush=True)
                local.close()
                if remote is not None:
                    remote.close()
                if not ratios:
                    continue
                summary = (
                    f"{model}: in-process / bare rows/s median x{statistics.median(ratios):.3f} "
                    f"[{min(ratios):.3f}..{max(ratios):.3f}], CPU per row "
                    f"x{statistics.median(cpu):.3f}"
                )
                if remote_ratios:
                    summary += f", --server / bare median x{statistics.median(remote_ratios):.3f}"
                rss = peak_rss(model, source, work / "rss")
                summary += f"; peak RSS of a job on {args.rows} rows: {rss:.0f} MiB"
                print(summary, flush=True)
            if args.memory_gib:
                large = work / "large.parquet"
                rows = write_large_input("image_classifier", args.memory_gib, large)
                start = time.perf_counter()
                rss = peak_rss("image_classifier", large, work / "large-out")
                print(
                    f"image_classifier on {args.memory_gib:g} GiB of Parquet ({rows} rows): "
                    f"peak RSS {rss:.0f} MiB, {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
