"""Traffic policy: weighted canary routing, sticky A/B buckets, weight validation."""

from __future__ import annotations

import random

import pytest

from convoy.errors import InvalidInput
from convoy.rollouts.policy import BUCKETS, TrafficPolicy, bucket_of

KEYS = [f"user-{i}" for i in range(10_000)]


def test_ab_same_key_always_reaches_the_same_version() -> None:
    policy = TrafficPolicy.from_weights({"1": 50, "2": 50}, salt="exp", sticky=True)
    rngs = [random.Random(seed) for seed in range(3)]
    for key in KEYS[:500]:
        assert len({policy.choose(key, rng) for rng in rngs}) == 1


@pytest.mark.parametrize("candidate", [50.0, 10.0, 75.0])
def test_ab_ten_thousand_keys_split_within_two_points(candidate: float) -> None:
    policy = TrafficPolicy.from_weights({"1": 100 - candidate, "2": candidate}, "exp", True)
    share = sum(policy.choose(k, random.Random(0)) == "2" for k in KEYS) / len(KEYS)
    assert abs(share * 100 - candidate) <= 2.0


def test_ab_changing_50_50_to_60_40_moves_only_the_margin() -> None:
    before = TrafficPolicy.from_weights({"1": 50, "2": 50}, "exp", True)
    after = TrafficPolicy.from_weights({"1": 60, "2": 40}, "exp", True)
    rng = random.Random(0)
    moved = [k for k in KEYS if before.choose(k, rng) != after.choose(k, rng)]
    assert 0.08 <= len(moved) / len(KEYS) <= 0.12
    # Only towards the version that grew: nobody on "1" was sent to "2".
    assert all(before.choose(k, rng) == "2" and after.choose(k, rng) == "1" for k in moved)


def test_a_new_salt_reshuffles_keys() -> None:
    same = sum(bucket_of("a", k) == bucket_of("b", k) for k in KEYS[:1000])
    assert same < 10


def test_canary_weights_are_drawn_at_random_in_proportion() -> None:
    policy = TrafficPolicy.from_weights({"1": 95, "2": 5})
    rng = random.Random(7)
    share = sum(policy.choose(None, rng) == "2" for _ in range(20_000)) / 20_000
    assert 0.04 <= share <= 0.06
    # A key does not make a canary sticky.
    assert {policy.choose("same", rng) for _ in range(500)} == {"1", "2"}


def test_ab_request_without_key_falls_back_to_random() -> None:
    policy = TrafficPolicy.from_weights({"1": 50, "2": 50}, "exp", True)
    rng = random.Random(1)
    assert {policy.choose(None, rng) for _ in range(100)} == {"1", "2"}


def test_zero_and_full_weights_route_everything_one_way() -> None:
    rng = random.Random(3)
    full = TrafficPolicy.from_weights({"1": 0, "2": 100})
    assert {full.choose(None, rng) for _ in range(1000)} == {"2"}
    assert full.weights == {"1": 0.0, "2": 100.0}
    assert full.bounds[-1] == BUCKETS


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"1": 120, "2": -20}, "out of 0..100"),
        ({"1": 50, "2": 40}, "sum to 90"),
        ({}, "no version"),
        ({"1": float("nan"), "2": 100}, "out of 0..100"),
    ],
)
def test_invalid_weights_are_refused(weights: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        TrafficPolicy.from_weights(weights)
