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
