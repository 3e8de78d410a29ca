"""A seconds-long run of the garbage-collection benchmark: both servers (the heap
frozen, and `--no-gc-freeze`) answer and the figures parse. Its figures are for
docs/benchmarks.md, never asserted here: this machine is shared and noisy."""

from __future__ import annotations

import re

import pytest

from loadtests.gc_pauses import main

pytestmark = pytest.mark.e2e

_LINE = re.compile(
    r"round 1\s+(?P<name>.+?): +(?P<rps>[\d.]+) req/s +CPU +(?P<cpu>[\d.]+) us/req +"
    r"p50 +(?P<p50>[\d.]+) ms +p99 +(?P<p99>[\d.]+) +p99.9 +(?P<p999>[\d.]+) +"
    r"errors (?P<errors>\d+)"
)


def test_both_servers_are_measured(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--duration", "1", "--rounds", "1", "--concurrency", "4"])
    printed = capsys.readouterr().out
    rows = {m["name"]: m for m in _LINE.finditer(printed)}
    assert list(rows) == ["frozen (default)", "--no-gc-freeze"], printed
    for name, row in rows.items():
        assert float(row["rps"]) > 0 and float(row["cpu"]) > 0, (name, printed)
        assert 0 < float(row["p50"]) <= float(row["p99"]) <= float(row["p999"]), (name, printed)
        assert row["errors"] == "0", (name, printed)
