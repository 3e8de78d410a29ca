"""A seconds-long smoke run of the load tools (CI never runs the full sweeps)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loadtests.bare import measure
from loadtests.bench import run_closed_loop
from loadtests.launch import start_convoy
from loadtests.overhead import overhead_us

from .conftest import ServerProcess


@pytest.mark.e2e
def test_closed_loop_bench_against_convoy(server: ServerProcess) -> None:
    result = run_closed_loop(server.url, "tiny", concurrency=4, duration=1.0, procs=1, warmup=0)
    assert result.requests > 0 and result.errors == 0
    assert result.p50_ms > 0 and result.p99_ms >= result.p50_ms
    assert result.avg_batch_size >= 1.0


def test_bare_model_loop(examples_dir: Path) -> None:
    (result,) = measure(examples_dir / "tiny", [4], duration=0.2)
    assert result.batches > 0 and result.rows_per_s > 0


def test_codec_cost_measures_every_step(examples_dir: Path) -> None:
    from loadtests.codec_cost import measure as codec_cost

    figures = asyncio.run(codec_cost("tiny", 200))
    assert set(figures) == {"parse", "decode", "encode", "serialize"}
    assert all(us > 0 for us in figures.values())


def test_capture_cost_times_both_sides_and_writes_every_row(examples_dir: Path) -> None:
    from loadtests.capture_cost import answered, measure

    items = answered("tiny", 50)
    loop_us, writer_us = measure(items)
    assert loop_us > 0 and writer_us > 0


def test_batcher_overhead() -> None:
    us, batch = asyncio.run(overhead_us(2000, 8))
    assert us > 0 and 1.0 <= batch <= 8.0


@pytest.mark.e2e
def test_open_loop_bench_with_csv_and_plot(server: ServerProcess, tmp_path: Path) -> None:
    from loadtests.bench import plot, run_open_loop, write_csv

    result = run_open_loop(server.url, "tiny", rate=50, duration=1.0, procs=1)
    assert result.requests > 10 and result.errors == 0
    write_csv([result], str(tmp_path / "r.csv"))
    assert (tmp_path / "r.csv").read_text().startswith("model,concurrency")
    plot([result], str(tmp_path / "r.png"), "smoke")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_locustfile_headless(server: ServerProcess, tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import ROOT

    csv = tmp_path / "locust"
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
         "-u", "4", "-r", "4", "-t", "3s", "--host", server.url,
         "--models", "tiny:3,image_classifier:1", "--csv", str(csv), "--only-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    stats = (tmp_path / "locust_stats.csv").read_text().splitlines()
    rows = {line.split(",")[1]: line.split(",") for line in stats[1:]}
    assert int(rows["ModelInfer tiny"][2]) > 0  # requests
    assert int(rows["Aggregated"][3]) == 0  # failures


@pytest.mark.e2e
def test_side_by_side_harness_with_local_peers(tmp_path: Path) -> None:
    """The comparison, cut to the peers that need no extra environment (CI has none)."""
    from loadtests.compare import main

    out = tmp_path / "compare.md"
    main(["--duration", "0.5", "--concurrency", "1", "--procs", "1",
          "--peers", "convoy,echo", "--out", str(out), "--csv", str(tmp_path / "c.csv"),
          "--plot", str(tmp_path / "c.png")])  # fmt: skip
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "c.csv").read_text().count("\n") == 3  # header + two peers
    table = out.read_text()
    assert "| convoy |" in table and "| echo |" in table
    assert "errors" not in table


def test_gpu_bench_served_against_bare_runs_on_the_cpu(tmp_path: Path) -> None:
    """The GPU benchmark's served-vs-bare step, run on the CPU so that the script a
    lent GPU's few minutes depend on is known to work before it gets there."""
    import torch

    from loadtests.gpu_bench import cnn, served_against_bare

    path = tmp_path / "model.pt"
    torch.jit.script(cnn()).save(str(path))
    served, bare, p99 = served_against_bare(path, 1.0, 4, 1, 1, device="cpu")
    assert served > 0 and bare > 0 and p99 > 0


def test_engine_cost_runs_the_engines_path_without_sockets() -> None:
    """Every request answered OK through the real EngineLink, queue and instance; the
    batch sizes follow the concurrency (a closed loop of c callers)."""
    import uvloop

    from loadtests.engine_cost import measure, split

    low, high = uvloop.run(measure([1, 8], 400, 2))
    assert low.rows_per_batch == 1.0 and 1.0 < high.rows_per_batch <= 8.0
    assert all(us > 0 for us in (*low.cpu_us, *high.cpu_us, *low.wall_us))
    assert high.calls < low.calls  # a batch's calls shared by more requests
    per_batch, per_request = split(low, high)
    assert per_batch + per_request == pytest.approx(low.best)


@pytest.mark.e2e
def test_batch_online_p99_pauses_and_resumes_a_real_job(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.batch_online_p99 import main

    main(["--rounds", "1", "--duration", "1", "--rate", "50", "--rows", "300000",
          "--job-args", "--rate 20000"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "round 1: p99 alone" in printed and "errors 0/0" in printed
    assert "while the job ran: it scored" in printed


@pytest.mark.e2e
def test_capture_overhead_pairs_slices_of_two_servers(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.capture_overhead import main

    main(["--models", "tiny", "--pairs", "2", "--duration", "1", "--settle", "0.2",
          "--warmup", "0.5"])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("capture off") == printed.count("capture on ") == 2
    assert "errors 0" in printed and " 0 dropped" in printed
    assert "tiny: throughput x" in printed and "over 2 pairs" in printed


@pytest.mark.e2e
def test_capture_overhead_runs_fresh_servers_and_takes_the_median_of_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loadtests.capture_overhead import main

    main(["--models", "tiny", "--runs", "2", "--pairs", "1", "--duration", "1", "--settle", "0",
          "--warmup", "0.2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "run 1/2" in printed and "run 2/2" in printed
    assert printed.count("capture off") == printed.count("capture on ") == 2
    assert "over 1 pairs of each of 2 runs" in printed and " 0 dropped" in printed
    assert "median [range] over 2 runs of each run's median:" in printed
    assert printed.rstrip().splitlines()[-1].lstrip().startswith("tiny: throughput x")


@pytest.mark.e2e
def test_capture_overhead_aa_runs_two_servers_without_capture(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loadtests.capture_overhead import main

    main(["--aa", "--models", "tiny", "--pairs", "1", "--duration", "1", "--settle", "0"])
    printed = capsys.readouterr().out
    assert "both without capture (A/A)" in printed and "rows written" not in printed
    assert "first server" in printed and "second server" in printed and "capture on" not in printed


@pytest.mark.e2e
def test_a_server_that_hangs_while_starting_is_reported_with_its_stacks(tmp_path: Path) -> None:
    """start_convoy's timeout: the error shows where every thread of the server was (a
    start-up that printed nothing for 120 s in CI left nothing to go on)."""
    model = tmp_path / "repo" / "hangs"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(
        "import time\n\nclass Model:\n    def __init__(self, config):\n"
        "        time.sleep(600)\n\n    def __call__(self, inputs):\n        return inputs\n"
    )
    (model / "config.pbtxt").write_text(
        'name: "hangs"\nbackend: "convoy_python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    # Time for the interpreter's start and imports on a busy machine, then the model.
    with pytest.raises(RuntimeError, match="server did not start in 25 s") as raised:
        start_convoy(tmp_path / "repo", timeout=25)
    message = str(raised.value)
    assert "Fatal Python error: Aborted" in message
    assert f'File "{model / "1" / "model.py"}", line 5 in __init__' in message
