"""Prometheus view of the rollouts, read from the controller at scrape time.

    convoy_rollout_weight{model,version}          percent of unversioned requests
    convoy_rollout_phase{model}                   1 progressing, 2 paused, 3 promoted, 4 rolled_back
    convoy_rollout_events_total{model,event}      started, step, inconclusive, promoted, ...
    convoy_rollout_shadow_shed_total{model,version}   mirrored runs dropped by the shadow budget
    convoy_rollout_divergence{model,version,output}   histogram of per-request max abs diff
                                                      against stable (version: the candidate)

A collector rather than metric objects: nothing on the hot path touches a metric,
and a model's series vanish with its rollout state. The scrape runs on the metrics
server's thread while the event loop changes the rollouts: it reads one snapshot
(RolloutController.snapshot), never the controller's live dicts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .controller import RolloutController

PHASE_VALUES = {"progressing": 1, "paused": 2, "promoted": 3, "rolled_back": 4}


class RolloutCollector(Collector):
    def __init__(self, controller: RolloutController) -> None:
        self._controller = controller

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read only when scraped, not when registered

    def collect(self) -> Iterator[Metric]:
        snapshot = self._controller.snapshot()
        weight = GaugeMetricFamily(
            "convoy_rollout_weight",
            "Percent of unversioned requests routed to the version by its model's rollout",
            labels=["model", "version"],
        )
        phase = GaugeMetricFamily(
            "convoy_rollout_phase",
            "Rollout phase: 1 progressing, 2 paused, 3 promoted, 4 rolled_back",
            labels=["model"],
        )
        for model, phase_name, weights in snapshot.rollouts:
            for version, percent in weights.items():
                weight.add_metric([model, version], percent)
            phase.add_metric([model], PHASE_VALUES[phase_name])
        events = CounterMetricFamily(
            "convoy_rollout_events", "Rollout events by kind", labels=["model", "event"]
        )
        for (model, event), count in sorted(snapshot.events.items()):
            events.add_metric([model, event], count)
        shed = CounterMetricFamily(
            "convoy_rollout_shadow_shed",
            "Mirrored (shadow or comparison) runs dropped because the shadow budget was spent",
            labels=["model", "version"],
        )
        for (model, version), count in sorted(snapshot.shadow_shed.items()):
            shed.add_metric([model, version], count)
        divergence = HistogramMetricFamily(
            "convoy_rollout_divergence",
            "Per-request max absolute difference of an output, candidate against stable",
            labels=["model", "version", "output"],
        )
        for (model, version, output), (buckets, total) in sorted(snapshot.divergence.items()):
            divergence.add_metric([model, version, output], buckets, sum_value=total)
        yield from (weight, phase, events, shed, divergence)
