"""Per-version windowed statistics for the analysis: counts, errors, latency, divergence.

Recording is O(1) with no allocation (fixed rings); percentiles are
computed only when the analysis reads a snapshot, once per tick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import (
    Cancelled,
    ConfigError,
    ConvoyError,
    InvalidInput,
    ModelNotFound,
    Unimplemented,
)
from ..monitoring.objectives import Kind, Objective, counts_for_availability

SAMPLES = 4096  # latency samples kept per window: the p99 of the most recent ones

# The caller's mistakes say nothing about the version that refused them.
# DeadlineExceeded and Overloaded stay server-side: a slow candidate causes them.
_CLIENT_ERRORS: tuple[type[ConvoyError], ...] = (
    InvalidInput,
    ConfigError,
    ModelNotFound,
    Unimplemented,
    Cancelled,
)


def is_server_error(error: ConvoyError | BaseException | None) -> bool:
    if error is None:
        return False
    return not isinstance(error, _CLIENT_ERRORS)


@dataclass(frozen=True)
class WindowStats:
    requests: int  # answered, client mistakes excluded
    errors: int  # server-side errors among them
    queue_p99_ms: float | None  # None: no sample
    compute_p99_ms: float | None
    compared: int  # requests whose outputs were compared with the other version's
    max_divergence: float | None  # the largest divergence score among them
    top1_agreement: float | None  # share of compared classification rows whose top-1 agreed
    shadow_shed: int  # mirror runs skipped because the shadow budget was spent
    # The highest burn rate among the model's SLOs in this window (None: none judged).
    burn_rate: float | None = None
    burn_slo: str = ""
    burn_events: int = 0  # the events that burn rate is computed over

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class _Ring:
    # A preallocated list: storing a float into it costs a tenth of a numpy item write.
    def __init__(self, size: int) -> None:
        self._values = [0.0] * size
        self._size = size
        self._next = 0
        self._count = 0

    def add(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % self._size
        self._count += 1

    def p99(self) -> float | None:
        filled = min(self._count, self._size)
        return float(np.percentile(self._values[:filled], 99)) if filled else None

    def clear(self) -> None:
        self._next = self._count = 0


class VersionWindow:
    """One version's figures since the window was last reset. With `objectives` (the
    model's SLOs, for a max_burn_rate gate) it also counts their good and bad events."""

    def __init__(self, samples: int = SAMPLES, objectives: Sequence[Objective] = ()) -> None:
        self._queue = _Ring(samples)
        self._compute = _Ring(samples)
        self.objectives = tuple(o for o in objectives if o.kind is not Kind.QUALITY)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.errors = 0
        self.compared = 0
        self.max_divergence: float | None = None
        self.top1_rows = 0
        self.top1_agreed = 0
        self.shadow_shed = 0
        self.slo_good = [0] * len(self.objectives)
        self.slo_bad = [0] * len(self.objectives)
        self._queue.clear()
        self._compute.clear()

    def record(
        self, error: ConvoyError | BaseException | None, queue_ns: int, compute_ns: int
    ) -> None:
        """One answered request. Client mistakes are not the version's fault: skipped."""
        if self.objectives:
            self._count_slo_events(error, (queue_ns + compute_ns) / 1e6)
        if error is not None and not is_server_error(error):
            return
        self.requests += 1
        if error is not None:
            self.errors += 1
            return  # a failed request's latency would flatter the p99
        self._queue.add(queue_ns / 1e6)
        self._compute.add(compute_ns / 1e6)

    def _count_slo_events(self, error: ConvoyError | BaseException | None, ms: float) -> None:
        """The server's own SLO events (monitoring/burn.py) over this window, with two
        differences. Latency is `ms`, queue + compute: for a caller's request that is
        arrival to the queue's answer, the server-side request time burn.py reads (it
        stops its clock when the path hears the answer, a loop hop later). Background
        runs (shadow copies, replays), which burn.py does not count, count here, with
        their compute time alone (ServedModel passes no queue time for them): in a shadow
        rollout they are all the candidate has. Cache hits never reach a window."""
        for i, objective in enumerate(self.objectives):
            if objective.kind is Kind.AVAILABILITY:
                if not counts_for_availability(error):
                    continue
                bad = error is not None
            elif error is None:  # latency: answers only
                assert objective.threshold_ms is not None
                bad = ms > objective.threshold_ms
            else:
                continue
            if bad:
                self.slo_bad[i] += 1
            else:
                self.slo_good[i] += 1

    def _worst_burn(self) -> tuple[float | None, str, int]:
        worst: tuple[float | None, str, int] = (None, "", 0)
        for objective, good, bad in zip(self.objectives, self.slo_good, self.slo_bad, strict=True):
            events = good + bad
            rate = (bad / events) / objective.budget if events else 0.0
            if worst[0] is None or rate > worst[0]:
                worst = (rate, objective.name, events)
        return worst

    def record_divergence(self, score: float, top1_rows: int = 0, top1_agreed: int = 0) -> None:
        self.compared += 1
        if self.max_divergence is None or not score <= self.max_divergence:
            self.max_divergence = score
        self.top1_rows += top1_rows
        self.top1_agreed += top1_agreed

    def snapshot(self) -> WindowStats:
        burn, slo, events = self._worst_burn()
        return WindowStats(
            requests=self.requests,
            errors=self.errors,
            queue_p99_ms=self._queue.p99(),
            compute_p99_ms=self._compute.p99(),
            compared=self.compared,
            max_divergence=self.max_divergence,
            top1_agreement=self.top1_agreed / self.top1_rows if self.top1_rows else None,
            shadow_shed=self.shadow_shed,
            burn_rate=burn,
            burn_slo=slo,
            burn_events=events,
        )


def finite_or_none(value: float | None) -> float | str | None:
    """JSON has no infinity: report it as the string 'inf'."""
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


# max-abs-diff bucket bounds for the divergence histogram: float noise sits at
# 1e-7..1e-4 across runtimes; real behaviour changes show from 1e-2 up.
DIVERGENCE_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


class BucketCounts:
    """A cumulative-at-read histogram (Prometheus' shape) kept by the controller,
    so the exporter can read it at scrape time without owning a metric object."""

    def __init__(self, bounds: tuple[float, ...] = DIVERGENCE_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.observations = 0

    def observe(self, value: float) -> None:
        index = len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                index = i
                break
        self.counts[index] += 1
        self.observations += 1
        if math.isfinite(value):
            self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        running = 0
        out = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if math.isinf(bound) else repr(bound), running))
        return out
