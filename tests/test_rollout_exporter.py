"""Rollout metrics as Prometheus exposes them, read at scrape time."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from convoy.errors import InternalError
from convoy.rollouts.exporter import RolloutCollector
from convoy.rollouts.spec import make_spec
from tests.test_rollout_controller import CANARY, feed, make, run


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_weights_phase_and_events_follow_the_rollout() -> None:
    controller, _, _ = make()
    registry = CollectorRegistry()
    registry.register(RolloutCollector(controller))
    assert "convoy_rollout_weight{" not in scrape(registry)  # nothing until a rollout starts
    run(controller.start("m", "2", CANARY))
    text = scrape(registry)
    assert 'convoy_rollout_weight{model="m",version="1"} 95.0' in text
    assert 'convoy_rollout_weight{model="m",version="2"} 5.0' in text
    assert 'convoy_rollout_phase{model="m"} 1.0' in text
    assert 'convoy_rollout_events_total{event="started",model="m"} 1.0' in text
    feed(controller, 2000, lambda v, i: (InternalError("x") if v == "2" else None, 1, 1))
    run(controller.tick())
    text = scrape(registry)
    assert 'convoy_rollout_phase{model="m"} 4.0' in text
    assert 'convoy_rollout_weight{model="m",version="2"} 0.0' in text
    assert 'convoy_rollout_events_total{event="rolled_back",model="m"} 1.0' in text


def test_divergence_histogram_and_shed_counter_per_output() -> None:
    controller, _, _ = make()
    registry = CollectorRegistry()
    registry.register(RolloutCollector(controller))
    run(controller.start("m", "2", make_spec("shadow", shadow_fraction=1.0)))
    x = np.full((1, 2), 0.5, np.float32)
    controller.record_comparison("m", {"1": {"y": x, "z": x}, "2": {"y": x, "z": x + 0.05}})
    for _ in range(3):
        controller.mirror("m", "1")  # budget 2: the third is shed
    text = scrape(registry)
    labels = 'model="m",output="z",version="2"'
    assert f'convoy_rollout_divergence_bucket{{le="0.01",{labels}}} 0.0' in text
    assert f'convoy_rollout_divergence_bucket{{le="0.1",{labels}}} 1.0' in text
    assert f"convoy_rollout_divergence_count{{{labels}}} 1.0" in text
    assert 'convoy_rollout_divergence_bucket{le="1e-07",model="m",output="y",version="2"} 1.0' in (
        text
    )
    assert 'convoy_rollout_shadow_shed_total{model="m",version="2"} 1.0' in text
