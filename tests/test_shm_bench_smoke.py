"""A seconds-long run of the shared-memory benchmark: both modes answer, and agree."""

from __future__ import annotations

import re

import pytest

from loadtests.shm_bench import main

pytestmark = pytest.mark.e2e


def test_both_modes_answer_and_the_table_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--duration", "1", "--rounds", "1", "--concurrency", "2", "--warmup", "0"])
    printed = capsys.readouterr().out
    assert "answers agree" in printed, printed
    rows = {
        cells[0]: cells[1:]
        for line in printed.splitlines()
        if line.startswith("| ") and not line.startswith(("| mode", "| ---"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"raw_input_contents", "system shared memory"}, printed
    for mode, (rps, rows_s, p50, p99, batch, errors, cpu, ratio) in rows.items():
        assert float(rps) > 0 and float(rows_s) > 0, (mode, printed)
        assert 0 < float(p50) <= float(p99), (mode, printed)
        assert float(batch) >= 8, (mode, printed)  # every request is a batch of 8 rows
        assert errors == "0", (mode, printed)
        assert re.fullmatch(r"\d+ µs", cpu) and int(cpu.split()[0]) > 0, (mode, printed)
        assert float(ratio.rstrip("x")) > 0, (mode, printed)
