"""Prometheus view of the front ends, read at scrape time on the engine's one metrics
port (every ModelInfer is counted by the engine's model metrics already; these say
what the front ends themselves do):

    convoy_frontends                                front-end processes running
    convoy_frontend_restarts_total                  front ends restarted after dying
    convoy_frontend_shared_memory_segments          front ends' segments the engine maps
    convoy_frontend_tensor_bytes_total{direction,path}
        tensor bytes between front ends and the engine; direction "input" | "output",
        path "shared_memory" (through a segment) | "inline" (in the messages)
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine_link import EngineLink
from .supervisor import FrontendSupervisor


class FrontendCollector(Collector):
    def __init__(self, link: EngineLink, supervisor: FrontendSupervisor) -> None:
        self._link = link
        self._supervisor = supervisor

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read only when scraped, not when registered

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "convoy_frontends", "Front-end processes running", value=len(self._supervisor.pids)
        )
        yield CounterMetricFamily(
            "convoy_frontend_restarts",
            "Front-end processes restarted after they died",
            value=self._supervisor.restarts,
        )
        yield GaugeMetricFamily(
            "convoy_frontend_shared_memory_segments",
            "Front ends' shared-memory segments the engine has mapped",
            value=self._link.segments,
        )
        moved = CounterMetricFamily(
            "convoy_frontend_tensor_bytes",
            "Tensor bytes between the front ends and the engine, by direction and path",
            labels=["direction", "path"],
        )
        for (direction, path), count in sorted(self._link.tensor_bytes.items()):
            moved.add_metric([direction, path], count)
        yield moved
