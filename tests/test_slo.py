"""Latency-SLO batching: the controller backs off on misses and grows with headroom."""

from __future__ import annotations

import pytest

from convoy.batching.slo import WINDOW, SloController

MS = 1_000_000


def feed(controller: SloController, latency_ns: int, windows: int = 1) -> None:
    for _ in range(WINDOW * windows):
        controller.observe(latency_ns)


def test_starts_at_the_ceiling_batch_and_a_short_delay() -> None:
    c = SloController(target_ns=20 * MS, max_batch_size=64, max_delay_ns=5 * MS)
    assert c.batch_limit == 64
    assert c.delay_ns == 2 * MS  # a tenth of the target, under the configured 5 ms
    assert c.max_delay_ns == 5 * MS


def test_miss_backs_off_multiplicatively() -> None:
    c = SloController(target_ns=20 * MS, max_batch_size=64, max_delay_ns=5 * MS)
    feed(c, 30 * MS)
    assert c.batch_limit == 44 and c.delay_ns < 2 * MS
    assert c.last_p99_ns == 30 * MS
    feed(c, 30 * MS, windows=20)
    assert c.batch_limit == 1 and c.delay_ns == 0


def test_headroom_grows_additively_up_to_the_ceilings() -> None:
    c = SloController(target_ns=20 * MS, max_batch_size=64, max_delay_ns=5 * MS)
    feed(c, 30 * MS, windows=5)
    low_batch, low_delay = c.batch_limit, c.delay_ns
    feed(c, 5 * MS)
    assert c.batch_limit > low_batch and c.delay_ns == low_delay + MS
    feed(c, 5 * MS, windows=100)
    assert c.batch_limit == 64 and c.delay_ns == 5 * MS


def test_between_headroom_and_target_holds() -> None:
    c = SloController(target_ns=20 * MS, max_batch_size=64, max_delay_ns=5 * MS)
    before = c.state()
    feed(c, 17 * MS)
    after = c.state()
    assert (after.batch_limit, after.delay_ns) == (before.batch_limit, before.delay_ns)


def test_p99_not_mean_drives_it() -> None:
    c = SloController(target_ns=20 * MS, max_batch_size=64, max_delay_ns=5 * MS)
    for i in range(WINDOW):
        c.observe(50 * MS if i % 50 == 0 else 1 * MS)  # 2% slow: p99 is slow
    assert c.batch_limit < 64


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SloController(target_ns=0, max_batch_size=8, max_delay_ns=0)
