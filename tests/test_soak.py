"""The soak run, short: reloads and injected faults under load, reconciled exactly."""

from __future__ import annotations

import pytest

from loadtests.soak import soak


@pytest.mark.e2e
def test_short_soak_reconciles() -> None:
    report = soak(duration=6.0, clients=4, seed=1)
    assert report["lost"] == {"tiny": 0, "faulty": 0}, report
    assert report["wrong_results"] == 0
    assert report["reloads"] >= 1
    assert report["reconciled"], report
    rss = [mb for _, mb in report["rss_mb"]]  # type: ignore[attr-defined]
    assert max(rss) - rss[0] < 200, rss


@pytest.mark.e2e
def test_short_soak_through_two_front_ends_reconciles() -> None:
    """The same through two front-end processes: every call answered once, the server's
    counters agree, and the calls each front end passed on add up to what was sent."""
    report = soak(duration=6.0, clients=12, seed=2, frontends=2)
    assert report["lost"] == {"tiny": 0, "faulty": 0}, report
    assert report["wrong_results"] == 0 and report["reloads"] >= 1
    passed = report["frontend_requests"]
    assert sum(passed.values()) == sum(report["sent"].values()), report  # type: ignore[attr-defined]
    assert set(passed) == {"0", "1"}, report  # both carried calls (12 connections)
    assert report["reconciled"], report


@pytest.mark.e2e
def test_short_soak_with_capture_writes_a_row_for_every_answer() -> None:
    """Capture at 1.0 across file rotations (every second), reloads, faults and SIGTERM:
    the complete Parquet files hold one row per request the server answered."""
    report = soak(duration=6.0, clients=4, seed=3, capture=True)
    assert report["lost"] == {"tiny": 0, "faulty": 0}, report
    served = {m: report["server_success"].get(m, 0) + report["server_failure"].get(m, 0)  # type: ignore[attr-defined]
              for m in ("tiny", "faulty")}  # fmt: skip
    assert report["captured"] == served, report
    assert report["reconciled"], report
