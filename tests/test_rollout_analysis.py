"""The rollout state machine, driven by a fake clock: promote, roll back, hold, pause."""

from __future__ import annotations

import random

import numpy as np
import pytest

from convoy.errors import ConvoyError, InternalError, InvalidInput
from convoy.rollouts.analysis import Outcome, evaluate
from convoy.rollouts.controller import RolloutController
from convoy.rollouts.spec import Gates, make_spec
from convoy.rollouts.window import WindowStats
from tests.test_rollout_controller import (
    CANARY,
    Behaviour,
    FakeClock,
    FakeRepository,
    feed,
    make,
    run,
)


def failing(share: float, version: str = "2") -> Behaviour:
    """The candidate fails every 1/share-th request."""
    every = round(1 / share)

    def behaviour(v: str, i: int) -> tuple[ConvoyError | None, float, float]:
        if v == version and i % every == 0:
            return InternalError("batch failed"), 1.0, 10.0
        return None, 1.0, 10.0

    return behaviour


def test_good_canary_is_promoted_through_every_step() -> None:
    controller, repo, clock = make()
    run(controller.start("m", "2", CANARY))
    seen = []
    for _ in range(4):
        status = controller.status("m")[0]
        seen.append(status.weights["2"])
        counts = feed(controller, 2000)
        assert counts.get("2", 0) >= 50  # the candidate really got its share
        clock.now += 30
        run(controller.tick())
    status = controller.status("m")[0]
    assert seen == [5.0, 25.0, 50.0, 100.0]
    assert status.phase == "promoted"
    assert status.reason.startswith("all steps passed; gates passed: error_rate 0.0000")
    assert repo.pinned["m"] == "2" and controller.route("m") is None
    assert controller.events[("m", "step")] == 3 and controller.events[("m", "promoted")] == 1
    # The old version stays warm for keep_warm, then goes.
    clock.now += 299
    run(controller.tick())
    assert "1" in repo.loaded["m"]
    clock.now += 1
    run(controller.tick())
    assert repo.unloaded == ["1"] and controller.events[("m", "retired")] == 1


def test_error_rate_gate_rolls_back_at_once_and_names_the_figure() -> None:
    controller, repo, clock = make()
    run(controller.start("m", "2", CANARY))
    feed(controller, 2000, failing(0.2))
    clock.now += 5  # well inside the step interval
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "rolled_back"
    assert "error_rate 0.2" in status.reason and "> max_error_rate 0.01" in status.reason
    assert "(stable 0.0000)" in status.reason
    assert status.weights == {"1": 100.0, "2": 0.0}
    assert repo.pinned["m"] == "1"
    assert {controller.route("m") for _ in range(100)} == {None}
    # The rollout loaded v2, so v2 leaves once its keep-warm is over.
    clock.now += 300
    run(controller.tick())
    assert repo.unloaded == ["2"]


def test_a_few_failures_are_decisive_before_min_requests() -> None:
    controller, _, _ = make()
    run(controller.start("m", "2", CANARY))  # min_requests 50, max_error_rate 0.01
    for _ in range(2):
        controller.record("m", "2", InternalError("boom"), 0, 0)
    run(controller.tick())
    # Stable has no figures yet in this window: the errors may be the host's.
    assert controller.status("m")[0].phase == "progressing"
    for _ in range(50):
        controller.record("m", "1", None, 0, 0)
    run(controller.tick())
    # 2 errors out of at least 50 requests to come cannot stay under 1%.
    assert controller.status("m")[0].phase == "rolled_back"


def test_stable_failing_as_much_in_the_same_window_does_not_blame_the_candidate() -> None:
    controller, _, clock = make()
    spec = make_spec("canary", steps=(50.0, 100.0), gates=Gates(min_requests=50))
    run(controller.start("m", "2", spec))
    feed(controller, 2000, lambda v, i: (InternalError("down") if i % 5 == 0 else None, 1, 10))
    clock.now += 30
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "progressing" and status.weights["2"] == 100.0
    assert "stable as bad in the same window" in status.analysis


def test_compute_p99_gate_rolls_back_a_slower_candidate() -> None:
    controller, _, _ = make()
    spec = make_spec("canary", gates=Gates(min_requests=50, max_p99_ms=30))
    run(controller.start("m", "2", spec))
    feed(controller, 2000, lambda v, i: (None, 1.0, 60.0 if v == "2" else 10.0))
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "rolled_back"
    assert "compute p99 60.0 ms (stable 10.0 ms) > max_p99_ms 30" in status.reason


def test_queue_time_does_not_count_against_the_compute_gate() -> None:
    # At 5% the candidate's batches fill slowly: long queue waits, same compute.
    controller, _, clock = make()
    spec = make_spec("canary", gates=Gates(min_requests=50, max_p99_ms=30))
    run(controller.start("m", "2", spec))
    feed(controller, 2000, lambda v, i: (None, 80.0 if v == "2" else 1.0, 10.0))
    clock.now += 30
    run(controller.tick())
    assert controller.status("m")[0].weights["2"] == 25.0


def test_queue_p99_gate_when_asked_for() -> None:
    controller, _, _ = make()
    spec = make_spec("canary", gates=Gates(min_requests=50, max_queue_p99_ms=20))
    run(controller.start("m", "2", spec))
    feed(controller, 2000, lambda v, i: (None, 80.0 if v == "2" else 1.0, 10.0))
    run(controller.tick())
    assert "queue p99 80.0 ms (stable 1.0 ms) > max_queue_p99_ms 20" in (
        controller.status("m")[0].reason
    )


def test_divergence_gate_blocks_a_candidate_with_changed_outputs() -> None:
    controller, _, _ = make()
    spec = make_spec("canary", gates=Gates(min_requests=50, max_divergence=1e-3))
    assert spec.shadow_fraction == 0.05  # a divergence gate turns comparison on
    run(controller.start("m", "2", spec))
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    compared = 0
    for _ in range(400):
        served = controller.route("m") or "1"
        other = controller.mirror("m", served)
        if other is not None:
            controller.record("m", other, None, 0, 0)
            controller.mirror_done("m")
            outputs = {"1": {"y": 2 * x}, "2": {"y": 3 * x}}
            controller.record_comparison("m", outputs)
            compared += 1
    assert compared > 0
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "rolled_back"
    assert "divergence 1 over" in status.reason and "> max_divergence 0.001" in status.reason


def test_too_few_requests_hold_and_never_promote_or_roll_back() -> None:
    controller, _, clock = make()
    run(controller.start("m", "2", CANARY))
    for _ in range(5):
        clock.now += 30
        run(controller.tick())
    status = controller.status("m")[0]
    assert (status.phase, status.step, status.weights["2"]) == ("progressing", 1, 5.0)
    assert status.analysis.startswith("inconclusive, hold: 0 of min_requests 50")
    assert controller.events[("m", "inconclusive")] == 5
    # Low traffic accumulates across held intervals until it is enough to judge.
    for _ in range(2):
        controller.record("m", "2", None, 0, 1_000_000)
    for _ in range(2):
        for _ in range(24):
            controller.record("m", "2", None, 0, 1_000_000)
        clock.now += 30
        run(controller.tick())
    assert controller.status("m")[0].step == 2


def test_pause_holds_the_step_but_not_the_safety_net() -> None:
    controller, _, clock = make()
    run(controller.start("m", "2", CANARY))
    status = run(controller.pause("m"))
    assert status.phase == "paused" and "paused by the operator at v1 95%, v2 5%" in status.reason
    feed(controller, 2000)
    clock.now += 300
    run(controller.tick())
    assert controller.status("m")[0].weights["2"] == 5.0
    with pytest.raises(InvalidInput, match="already paused"):
        run(controller.pause("m"))
    assert run(controller.resume("m")).phase == "progressing"
    run(controller.pause("m"))
    feed(controller, 2000, failing(0.5))
    run(controller.tick())
    assert controller.status("m")[0].phase == "rolled_back"


def test_operator_promote_and_rollback_after_promotion_within_keep_warm() -> None:
    controller, repo, clock = make()
    run(controller.start("m", "2", CANARY))
    assert run(controller.promote("m")).phase == "promoted"
    assert repo.pinned["m"] == "2"
    with pytest.raises(InvalidInput, match="rollout has ended"):
        run(controller.pause("m"))
    clock.now += 10
    status = run(controller.rollback("m"))
    assert status.phase == "rolled_back" and repo.pinned["m"] == "1"
    assert repo.unloaded == []  # v1 was still warm: no reload, instant
    with pytest.raises(InvalidInput, match="already rolled back"):
        run(controller.rollback("m"))


def test_rollback_after_keep_warm_reloads_the_old_version() -> None:
    controller, repo, clock = make()
    run(controller.start("m", "2", CANARY))
    run(controller.promote("m"))
    clock.now += 301
    run(controller.tick())
    assert "1" not in repo.loaded["m"]
    run(controller.rollback("m"))
    assert "1" in repo.loaded["m"] and repo.pinned["m"] == "1"


def test_blue_green_switches_at_once_then_bakes_before_promotion() -> None:
    controller, repo, clock = make()
    spec = make_spec("blue-green", step_interval_s=60, gates=Gates(min_requests=50))
    status = run(controller.start("m", "2", spec))
    assert status.weights == {"1": 0.0, "2": 100.0}
    assert feed(controller, 100) == {"2": 100}
    clock.now += 60
    run(controller.tick())
    assert controller.status("m")[0].phase == "promoted"
    assert repo.pinned["m"] == "2" and "1" in repo.loaded["m"]


def test_blue_green_rolls_back_on_a_failing_candidate() -> None:
    controller, repo, _ = make()
    run(controller.start("m", "2", make_spec("blue-green", gates=Gates(min_requests=50))))
    feed(controller, 200, failing(0.2))
    run(controller.tick())
    assert controller.status("m")[0].phase == "rolled_back" and repo.pinned["m"] == "1"


def test_shadow_reports_divergence_without_acting() -> None:
    controller, _, clock = make()
    spec = make_spec("shadow", shadow_fraction=1.0, gates=Gates(min_requests=5, max_divergence=0.1))
    run(controller.start("m", "2", spec))
    x = np.ones((1, 4), np.float32)
    for _ in range(10):
        assert controller.route("m") == "1"
        controller.record("m", "1", None, 0, 1_000_000)
        assert controller.mirror("m", "1") == "2"
        controller.record("m", "2", None, 0, 1_000_000)
        controller.mirror_done("m")
        controller.record_comparison("m", {"1": {"y": 2 * x}, "2": {"y": 3 * x}})
    clock.now += 30
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "progressing" and status.weights == {"1": 100.0, "2": 0.0}
    assert "divergence 1 over 10 compared > max_divergence 0.1" in status.analysis
    assert controller.events[("m", "analysis_failed")] == 1


def test_ab_has_no_automatic_winner() -> None:
    controller, _, clock = make()
    run(controller.start("m", "2", make_spec("ab", steps=(50.0,))))
    counts = {"1": 0, "2": 0}
    for i in range(2000):
        version = controller.route("m", f"user-{i}")
        assert version is not None
        counts[version] += 1
        controller.record("m", version, InternalError("x") if version == "2" else None, 0, 0)
    clock.now += 3600
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "progressing"
    assert status.windows["2"].error_rate == 1.0 and status.windows["2"].requests == counts["2"]
    assert abs(counts["2"] / 2000 - 0.5) < 0.05


def _stats(requests: int, errors: int = 0, compute: float = 10.0) -> WindowStats:
    return WindowStats(requests, errors, 1.0, compute, 0, None, None, 0)


def test_evaluate_outcomes() -> None:
    gates = Gates(max_error_rate=0.05, max_p99_ms=50, min_requests=100)
    assert evaluate(gates, _stats(100), _stats(1000)).outcome is Outcome.PASS
    assert evaluate(gates, _stats(99), _stats(1000)).outcome is Outcome.INCONCLUSIVE
    assert evaluate(gates, _stats(100, errors=6), _stats(1000)).outcome is Outcome.FAIL
    slow = evaluate(gates, _stats(100, compute=70), None)
    assert slow.outcome is Outcome.FAIL and "(stable n/a)" in slow.reason
    # Early errors are decisive against a stable judged healthy in the same window.
    assert evaluate(gates, _stats(10, errors=6), _stats(1000)).outcome is Outcome.FAIL
    assert evaluate(gates, _stats(10, errors=6), _stats(10)).outcome is Outcome.INCONCLUSIVE
    assert evaluate(gates, _stats(10, errors=6), None).outcome is Outcome.INCONCLUSIVE


def test_both_over_a_gate_blames_the_candidate_only_when_clearly_worse() -> None:
    gates = Gates(max_error_rate=0.05, max_p99_ms=50, min_requests=100)
    # Both at ~20% errors: the host or a dependency, not the candidate.
    same = evaluate(gates, _stats(1000, errors=210), _stats(1000, errors=200))
    assert same.outcome is Outcome.PASS and "stable as bad" in same.reason
    # 40% against 20% on 1000 requests each is far past chance (z ~ 9.7).
    worse = evaluate(gates, _stats(1000, errors=400), _stats(1000, errors=200))
    assert worse.outcome is Outcome.FAIL
    # Latency: both over 50 ms; blamed only at 1.5x stable's p99.
    assert evaluate(gates, _stats(1000, compute=70), _stats(1000, compute=60)).outcome is (
        Outcome.PASS
    )
    assert evaluate(gates, _stats(1000, compute=95), _stats(1000, compute=60)).outcome is (
        Outcome.FAIL
    )
    # Decisive early errors are not decisive when stable is failing as much.
    assert evaluate(gates, _stats(10, errors=6), _stats(1000, errors=600)).outcome is (
        Outcome.INCONCLUSIVE
    )


def test_checking_every_tick_does_not_add_up_to_false_rollbacks() -> None:
    """Both versions failing 20% at random, judged every second for 30 s, 20 seeds."""
    rolled_back = 0
    for seed in range(20):
        controller = RolloutController(FakeRepository(), None, FakeClock(), random.Random(seed))
        spec = make_spec("canary", steps=(50.0, 100.0), gates=Gates(min_requests=50))
        run(controller.start("m", "2", spec))
        errors = random.Random(seed + 1000)
        for second in range(30):
            for _ in range(70):
                version = controller.route("m") or "1"
                error = InternalError("down") if errors.random() < 0.2 else None
                controller.record("m", version, error, 0, 0)
            run(controller.tick(1000.0 + second))
        rolled_back += controller.status("m")[0].phase == "rolled_back"
    assert rolled_back == 0
