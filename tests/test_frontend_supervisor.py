"""The supervisor's restart back-off and the front-end count rule, without processes."""

from __future__ import annotations

from convoy.workers.supervisor import RestartBackoff, default_frontends


def test_a_front_end_that_served_a_while_is_restarted_at_once() -> None:
    backoff = RestartBackoff()
    assert [backoff.delay(lived_s=600.0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_front_ends_that_keep_dying_young_wait_longer_each_time_up_to_the_cap() -> None:
    backoff = RestartBackoff(base_s=0.5, cap_s=4.0, settled_s=10.0)
    delays = [backoff.delay(lived_s=1.0) for _ in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(lived_s=10.0) == 0.0  # one that settled resets the slot
    assert backoff.delay(lived_s=1.0) == 0.0


def test_one_front_end_per_four_cores_between_one_and_eight() -> None:
    assert [default_frontends(c) for c in (1, 2, 4, 7, 8, 16, 64, 128)] == [1, 1, 1, 1, 2, 4, 8, 8]
