"""Prometheus view of the front ends, read at scrape time on the engine's one metrics
port (every ModelInfer is counted by the engine's model metrics already; these say
what the front ends themselves do):

    convoy_frontends                                front-end processes running
    convoy_frontend_restarts_total                  front ends restarted after dying
    convoy_frontend_shared_memory_segments          front ends' segments the engine maps
    convoy_frontend_tensor_bytes_total{direction,path}
        tensor bytes between front ends and the engine; direction "input" | "output",
        path "shared_memory" (through a segment) | "inline" (in the messages)
    convoy_frontend_requests_total{frontend}        ModelInfer calls each front end passed on
    convoy_frontend_cpu_seconds_total{frontend}     each front end's CPU (user + system)
    convoy_frontend_resident_memory_bytes{frontend} each front end's resident memory
    convoy_frontend_gc_pause_seconds{frontend,generation}
        each front end's garbage-collection pauses, as convoy_gc_pause_seconds is the
        engine's: reported by the front end every REPORT_INTERVAL_S (process.py)

`frontend` is the slot, "0" to "N-1": a front end restarted after dying takes its
predecessor's slot. Requests are the engine's own count and carry on across restarts, as
do the GC pauses (a dead front end's last report stays in the slot's totals);
CPU and memory are read from /proc at scrape time, so a restarted front end's CPU
starts again from zero (a counter reset, as for any restarted process).
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

from ..heap import BOUND_LABELS
from ..procstat import process_usage
from .engine_link import EngineLink
from .supervisor import FrontendSupervisor
from .wire import peer_index, per_slot


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
        requests = CounterMetricFamily(
            "convoy_frontend_requests",
            "ModelInfer calls each front end passed to the engine",
            labels=["frontend"],
        )
        for index, count in sorted(per_slot(dict(self._link.requests)).items()):
            requests.add_metric([str(index)], count)
        yield requests
        cpu = CounterMetricFamily(
            "convoy_frontend_cpu_seconds",
            "CPU time (user and system) of each front-end process",
            labels=["frontend"],
        )
        memory = GaugeMetricFamily(
            "convoy_frontend_resident_memory_bytes",
            "Resident memory of each front-end process",
            labels=["frontend"],
        )
        for index, pid in sorted(self._supervisor.pids_by_index.items()):
            usage = process_usage(pid)
            if usage is not None:  # gone between the listing and the read
                cpu.add_metric([str(index)], usage[0])
                memory.add_metric([str(index)], usage[1])
        yield cpu
        yield memory
        pauses = HistogramMetricFamily(
            "convoy_frontend_gc_pause_seconds",
            "Time each garbage collection stopped a front-end process, by generation",
            labels=["frontend", "generation"],
        )
        for (index, generation), (counts, total) in sorted(self._gc_pauses().items()):
            buckets = list(zip(BOUND_LABELS, counts, strict=True))
            pauses.add_metric([str(index), generation], buckets, total)
        yield pauses

    def _gc_pauses(self) -> dict[tuple[int, str], tuple[list[float], float]]:
        """(slot, generation) -> cumulative bucket counts and sum, over every process
        that has held the slot (a restart adds to its predecessor's last report)."""
        found: dict[tuple[int, str], tuple[list[float], float]] = {}
        # Copies: the event loop adds identities while this runs in the scrape thread.
        for identity, report in list(self._link.gc_pauses.items()):
            index = peer_index(identity)
            if index is None:
                continue
            for generation, (counts, total) in report.items():
                seen = found.get((index, generation))
                if seen is not None:
                    counts = [a + b for a, b in zip(seen[0], counts, strict=True)]
                    total += seen[1]
                found[index, generation] = (counts, total)
        return found
