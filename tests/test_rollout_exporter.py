"""Rollout metrics as Prometheus exposes them, read at scrape time."""

from __future__ import annotations

import gc
import itertools
import random

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from convoy.errors import InternalError
from convoy.rollouts.compare import OutputDivergence
from convoy.rollouts.controller import RolloutController
from convoy.rollouts.exporter import RolloutCollector
from convoy.rollouts.spec import make_spec
from tests.test_rollout_controller import CANARY, FakeClock, FakeRepository, feed, make, run


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


def test_a_scrape_reads_a_snapshot_while_the_loop_changes_the_rollouts() -> None:
    """Prometheus scrapes on the metrics server's thread while the event loop goes on.
    Here the loop's changes run in the middle of the scrape, from the garbage
    collector's callback, as they do when a collection during the scrape lets the
    loop's thread take the GIL: a mirrored run shed, an output compared for the first
    time, a rollout rolled back. Thousands of series (one per output compared) keep
    the scrape's iterations long enough for a collection to fall inside one. The
    scrape must not fail (dictionary changed size during iteration)."""
    models = [f"m{i}" for i in range(20)]
    repo = FakeRepository(
        on_disk={m: ["1", "2"] for m in models}, loaded={m: {"1"} for m in models}
    )
    controller = RolloutController(repo, None, FakeClock(), random.Random(0), shadow_inflight=0)
    registry = CollectorRegistry()
    registry.register(RolloutCollector(controller))
    for model in models:
        run(controller.start(model, "2", make_spec("shadow", shadow_fraction=1.0)))
    close = OutputDivergence(1e-6, None, 0, 0)
    controller.record_divergences("m0", {f"y{i}": close for i in range(3000)})
    steps = itertools.count()

    def loop_step(phase: str, info: dict[str, int]) -> None:
        if phase != "start":
            return
        step = next(steps)
        if step % 50 == 0:  # often enough to fall inside an iteration, seldom enough to be quick
            controller.record_divergences("m0", {f"late{step}": close})
        controller.mirror(models[1 + step % 9], "1")  # shed: budget 0
        if step < 10:
            model = models[10 + step]
            repo.loaded[model].discard("2")
            controller.versions_changed(model)  # rolled back

    threshold = gc.get_threshold()
    gc.callbacks.append(loop_step)
    gc.set_threshold(1)
    try:
        text = scrape(registry)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(loop_step)
    assert next(steps) > len(models)  # the loop did change things during the scrape
    assert 'convoy_rollout_phase{model="m19"}' in text
    assert text.count("convoy_rollout_divergence_count{") >= 3000
