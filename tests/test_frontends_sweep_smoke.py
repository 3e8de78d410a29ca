"""A seconds-long front-end sweep: two front ends and the echo server answer, and the
front ends' CPU is counted beside the engine's. One point only: each server start
imports torch, which costs seconds on a loaded host."""

from __future__ import annotations

import os

import pytest

from loadtests.frontends_sweep import cpu_list, main

pytestmark = pytest.mark.e2e


def _cpu_us(cell: str) -> int:
    value, unit = cell.split()
    assert unit == "µs", cell
    return int(value)


def test_sweep_prints_sane_figures(capsys: pytest.CaptureFixture[str]) -> None:
    cores = sorted(os.sched_getaffinity(0))
    # The servers on the first core, the clients on every core (on a 1-core host, both on it).
    every = ",".join(map(str, cores))
    main(["--duration", "1", "--frontends", "2", "--warmup", "0", "--echo-runs", "1",
          "--server-cpus", str(cores[0]), "--client-cpus", every])  # fmt: skip
    assert os.sched_getaffinity(0) == set(cores)  # the sweep's own affinity is given back
    printed = capsys.readouterr().out
    assert f"servers on cores {cores[0]}, clients on {every}" in printed
    rows = {
        cells[0]: cells[1:]
        for line in printed.splitlines()
        if line.startswith("| ") and not line.startswith(("| server", "| ---"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert list(rows) == ["echo", "`--frontends 2`"], printed
    for name, (rps, p50, p99, errors, engine, total, ratio, _busy) in rows.items():
        assert float(rps) > 0 and 0 < float(p50) <= float(p99), (name, printed)
        assert errors == "0", (name, printed)
        assert 0 < _cpu_us(engine) <= _cpu_us(total), (name, printed)
        assert float(ratio.rstrip("x")) > 0, (name, printed)
    echo, two = rows["echo"], rows["`--frontends 2`"]
    assert echo[4] == echo[5] and echo[6] == "1.00x"  # one process
    assert _cpu_us(two[4]) < _cpu_us(two[5])  # the front ends' share is counted
    assert two[7] in ("1 of 2", "2 of 2"), printed
    assert "each front end's CPU per request" in printed, printed
    assert "the engine's event-loop thread spent" in printed, printed


def test_cpu_lists_read_as_taskset_reads_them() -> None:
    assert cpu_list("0-3,7") == {0, 1, 2, 3, 7}
    assert cpu_list("5") == {5}
