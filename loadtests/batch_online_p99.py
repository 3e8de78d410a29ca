"""Online callers beside a batch job: their p99 under steady load, alone and while
`convoy batch --server` scores the same model at background priority.

    python -m loadtests.batch_online_p99 --model tiny --rate 200 --duration 10 --rounds 2

`convoy serve` on the built-in examples; the online load is an open loop (Poisson arrivals
at --rate, loadtests.bench) of one-row requests; the batch job reads a Parquet file of
random rows long enough to outlast a round. Rounds alternate: alone, then with the job.
Prints both p99s, their ratio (target: at most x1.10) and the job's rows/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtests.bare import load_spec
from loadtests.batch_throughput import examples, write_input
from loadtests.bench import run_open_loop
from loadtests.launch import ROOT, start_convoy


def start_job(
    model: str, source: Path, output: Path, url: str, extra: list[str]
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "convoy.cli", "batch", model, "--input", str(source),
         "--output", str(output), "--server", url, *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def scored_rows(output: Path) -> int:
    manifest = output / "_convoy_batch.json"
    return int(json.loads(manifest.read_text())["rows"]) if manifest.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rate", type=float, default=200.0, help="online requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the batch input")
    parser.add_argument(
        "--job-args", default="", help="more `convoy batch` flags, e.g. '--concurrency 1'"
    )
    args = parser.parse_args()
    spec = load_spec(examples() / args.model)
    print(f"{args.model}: max_batch_size {spec.max_batch_size}, online {args.rate:g} req/s")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        source = work / "rows.parquet"
        write_input(args.model, args.rows, source)
        server = start_convoy(examples())
        alone: list[float] = []
        beside: list[float] = []
        try:
            run_open_loop(server.url, args.model, args.rate, 2.0)  # warm-up
            for r in range(args.rounds):
                quiet = run_open_loop(server.url, args.model, args.rate, args.duration)
                alone.append(quiet.p99_ms)
                output = work / f"out-{r}"
                job = start_job(args.model, source, output, server.url, args.job_args.split())
                deadline = time.monotonic() + 120
                while scored_rows(output) == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)  # the job has loaded and scores
                before, start = scored_rows(output), time.perf_counter()
                busy = run_open_loop(server.url, args.model, args.rate, args.duration)
                rate = (scored_rows(output) - before) / (time.perf_counter() - start)
                job.kill()
                job.wait()
                beside.append(busy.p99_ms)
                print(
                    f"round {r + 1}: online p99 alone {quiet.p99_ms:.2f} ms (p50 "
                    f"{quiet.p50_ms:.2f}), beside the job {busy.p99_ms:.2f} ms (p50 "
                    f"{busy.p50_ms:.2f}), x{busy.p99_ms / quiet.p99_ms:.2f}; errors "
                    f"{quiet.errors}/{busy.errors}; the job ~{rate:.0f} rows/s",
                    flush=True,
                )
        finally:
            server.stop()
    ratio = statistics.median(np.array(beside) / np.array(alone))
    print(f"median p99 ratio x{ratio:.2f} (target <= x1.10)")


if __name__ == "__main__":
    main()
