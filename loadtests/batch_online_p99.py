"""Online callers beside a batch job: their p99 under steady load, alone and while
`convoy batch --server` scores the same model at background priority.

    python -m loadtests.batch_online_p99 --model tiny --rate 200 --duration 5 --rounds 6
    python -m loadtests.batch_online_p99 --model image_classifier --rate 50 --rows 20000

`convoy serve` on the built-in examples; the online load is an open loop (Poisson arrivals
at --rate, loadtests.bench) of one-row requests; the batch job (`convoy batch --server`,
its default --cpu-priority idle) reads a Parquet file of random rows long enough to outlast
the run. The job is started once; each round measures one slice of --duration seconds with
the job paused (SIGSTOP: its requests in flight are answered first, which the server may
hold for a while, pacing background work) and one with it running (SIGCONT), alternating
which comes first. A p99 is the 20th-largest of 2,000 samples at 10 s and 200 req/s, so
the slices of each kind are pooled: printed are the pooled p99s alone and beside the job,
their ratio (target: at most x1.10), the median of
the rounds' own ratios, the server's and the job's CPU while the job ran, and its rows/s.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtests.bare import load_spec
from loadtests.batch_throughput import examples, write_input
from loadtests.bench import build_request, open_loop_samples
from loadtests.launch import ROOT, cpu_seconds, start_convoy

JOB_ROWS_PER_S = 200_000  # more than the job scores beside the callers: its input outlasts
FILE_ROWS = 250_000


def write_repeated_input(model: str, rows: int, folder: Path) -> None:
    """A directory of `rows` random rows: one file of at most FILE_ROWS, linked as often
    as needed (a fast job reads millions of rows; generating them all costs GBs)."""
    folder.mkdir()
    first = folder / "part-00000.parquet"
    write_input(model, min(rows, FILE_ROWS), first)
    for i in range(1, math.ceil(rows / FILE_ROWS)):
        (folder / f"part-{i:05d}.parquet").symlink_to(first)


def start_job(
    model: str, source: Path, output: Path, url: str, extra: list[str]
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "convoy.cli", "batch", model, "--input", str(source),
         "--output", str(output), "--server", url, *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def served_rows(url: str, model: str) -> int:
    """Rows the server has computed for the model, callers' and the job's: the job's
    progress between two reads, less the callers' one-row requests (its output's
    manifest moves by whole parts, minutes apart for a job paced beside callers)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model, as_json=True)
    return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))


def settle(url: str, model: str) -> None:
    """Wait until the paused job's requests in flight are answered: the server paces
    background work while callers are about, so some may wait there for seconds; with
    no caller about (none now) they are answered at once once the callers' second ends."""
    time.sleep(1.2)
    rows = served_rows(url, model)
    for _ in range(100):
        time.sleep(0.3)
        now = served_rows(url, model)
        if now == rows:
            return
        rows = now


def p99(latencies: list[float]) -> float:
    return float(np.percentile(np.array(latencies) * 1000, 99))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rate", type=float, default=200.0, help="online requests per second")
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds per slice (well under the job's 60 s request timeout: a paused job's "
        "requests in flight would expire)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="pairs of slices")
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows of the job's input (default: enough for tiny at 200,000 rows/s; "
        "image_classifier scores under 1,000 rows/s on 2 cores)",
    )
    parser.add_argument(
        "--job-args", default="", help="more `convoy batch` flags, e.g. '--concurrency 1'"
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="more `convoy serve` flags, e.g. '--background-loop-share 0.05'",
    )
    args = parser.parse_args(argv)
    spec = load_spec(examples() / args.model)
    print(f"{args.model}: max_batch_size {spec.max_batch_size}, online {args.rate:g} req/s")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        source, output = work / "rows", work / "out"
        rows = args.rows or int(JOB_ROWS_PER_S * args.duration * (args.rounds + 2))
        write_repeated_input(args.model, rows, source)
        server = start_convoy(examples(), *args.server_args.split())
        payload = build_request(server.url, args.model, 1)
        pooled: dict[str, list[float]] = {"alone": [], "beside": []}
        ratios: list[float] = []
        errors = {"alone": 0, "beside": 0}
        server_cpu = job_cpu = busy_s = 0.0
        scored = 0
        job = start_job(args.model, source, output, server.url, args.job_args.split())
        try:
            open_loop_samples(server.url, payload, args.rate, 2.0)  # warm-up
            before, deadline = served_rows(server.url, args.model), time.monotonic() + 120
            while served_rows(server.url, args.model) == before and time.monotonic() < deadline:
                time.sleep(0.2)  # the job has loaded and scores
            if job.poll() is not None or served_rows(server.url, args.model) == before:
                raise SystemExit("the batch job did not start scoring")
            for r in range(args.rounds):
                round_p99: dict[str, float] = {}
                round_rate = 0.0
                for kind in ("alone", "beside") if r % 2 == 0 else ("beside", "alone"):
                    os.kill(job.pid, signal.SIGCONT if kind == "beside" else signal.SIGSTOP)
                    if kind == "alone":
                        settle(server.url, args.model)
                    else:
                        time.sleep(0.5)  # the job's pace reached
                    cpu0, jcpu0 = cpu_seconds(server.proc.pid), cpu_seconds(job.pid)
                    rows0, start = served_rows(server.url, args.model), time.perf_counter()
                    latencies, failed = open_loop_samples(
                        server.url, payload, args.rate, args.duration
                    )
                    pooled[kind] += latencies
                    errors[kind] += failed
                    round_p99[kind] = p99(latencies)
                    if kind == "beside":
                        rows = served_rows(server.url, args.model) - rows0 - len(latencies)
                        if job.poll() is not None or rows <= 0:
                            raise SystemExit(  # else the slice measured callers alone
                                "the batch job ended or stopped scoring: give it more --rows"
                            )
                        round_rate = rows / (time.perf_counter() - start)
                        busy_s += time.perf_counter() - start
                        server_cpu += cpu_seconds(server.proc.pid) - cpu0
                        job_cpu += cpu_seconds(job.pid) - jcpu0
                        scored += rows
                ratios.append(round_p99["beside"] / round_p99["alone"])
                print(
                    f"round {r + 1}: p99 alone {round_p99['alone']:.2f} ms, beside the job "
                    f"{round_p99['beside']:.2f} ms, x{ratios[-1]:.2f}; "
                    f"the job {round_rate:.0f} rows/s",
                    flush=True,
                )
        finally:
            with contextlib.suppress(ProcessLookupError):  # a job that ended on its own
                os.kill(job.pid, signal.SIGCONT)
            job.kill()
            job.wait()
            server.stop()
    alone, beside = p99(pooled["alone"]), p99(pooled["beside"])
    medians = {k: float(np.percentile(np.array(v) * 1000, 50)) for k, v in pooled.items()}
    print(
        f"pooled over {args.rounds} x {args.duration:g} s each: online p99 alone {alone:.2f} ms "
        f"(p50 {medians['alone']:.2f}), beside the job {beside:.2f} ms (p50 "
        f"{medians['beside']:.2f}): x{beside / alone:.2f} (target <= x1.10); median of the "
        f"rounds x{statistics.median(ratios):.2f}; errors {errors['alone']}/{errors['beside']}"
    )
    print(
        f"while the job ran: it scored {scored / busy_s:.0f} rows/s; server CPU "
        f"{server_cpu / busy_s:.2f} cores, the job's {job_cpu / busy_s:.2f} cores"
    )


if __name__ == "__main__":
    main()
