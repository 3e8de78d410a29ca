"""A seconds-long smoke run of the load tools (CI never runs the full sweeps)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loadtests.bare import measure
from loadtests.bench import run_closed_loop
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


def test_batcher_overhead() -> None:
    us, batch = asyncio.run(overhead_us(2000, 8))
    assert us > 0 and 1.0 <= batch <= 8.0
