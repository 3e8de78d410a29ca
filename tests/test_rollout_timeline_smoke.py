"""A seconds-long run of the rollout timeline: a good candidate promoted under real load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.rollout_timeline import main

pytestmark = pytest.mark.e2e


def test_good_candidate_is_promoted_and_the_timeline_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "timeline.json"
    code = main([
        "--candidate", "good", "--rate", "80", "--steps", "50,100",
        "--duration-per-step", "1", "--min-requests", "10", "--max-seconds", "10",
        # A loose latency gate: a busy CI host must not fail a good candidate here.
        "--max-p99-ms", "1000", "--json", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "phase" in printed and "weights" in printed  # the table's header
    assert "summary: good candidate v2: promoted after" in printed, printed
    report = json.loads(out.read_text())
    assert report["summary"]["phase"] == "promoted"
    assert report["summary"]["failed"] == 0
    timeline = report["timeline"]
    assert len(timeline) >= 2 and timeline[-1]["phase"] == "promoted"
    # Callers saw both versions on the way, and only the candidate after the end.
    assert {"1", "2"} <= set(report["summary"]["answered"])
