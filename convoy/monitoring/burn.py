"""The server's own burn rates: per (model, objective) good and bad events, counted as
requests are answered, read over 5m, 30m, 1h and 6h.

Counting is two integer additions on the loop per objective (the path's answer
observer); a snapshot of the counts is kept every `interval_s` in a fixed ring, so a
window's burn rate is two subtractions, computed once a second by tick() (the server's
rollout ticker), never per request. The fast-burn condition found there (the 14.4x
page alert's, over 1h and 5m) sheds the model's background work first. DESIGN §14.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ConvoyError, Unavailable
from ..metrics import SloCounts, SloReading
from .objectives import (
    Kind,
    ModelObjectives,
    Objective,
    counts_for_availability,
    is_server_failure,
)

BURN_WINDOWS: tuple[tuple[str, int], ...] = (("5m", 300), ("30m", 1800), ("1h", 3600),
                                             ("6h", 21600))  # fmt: skip
FAST_BURN = 14.4  # the page alert's factor, over 1h and 5m both (slo_rules.BURN_ALERTS)
FAST_WINDOWS = ("1h", "5m")
SHED_REASON = "fast_burn"


# Read-only views (properties), so that the path's own types satisfy them.
class _Spec(Protocol):
    @property
    def name(self) -> str: ...


class _Served(Protocol):
    @property
    def spec(self) -> _Spec: ...


class _Request(Protocol):
    @property
    def background(self) -> bool: ...

    @property
    def arrival_ns(self) -> int: ...


class AnsweredRequest(Protocol):
    """What the tracker reads of the inference path's Answered record."""

    @property
    def served(self) -> _Served: ...

    @property
    def arm(self) -> str: ...

    @property
    def request(self) -> _Request | None: ...

    @property
    def error(self) -> ConvoyError | None: ...

    @property
    def done_ns(self) -> int: ...


@dataclass
class ObjectiveCounts:
    """One objective's events since start, and snapshots of them (oldest first)."""

    model: str
    objective: Objective
    slots: int
    good: int = 0
    bad: int = 0
    history: deque[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.history = deque([(0, 0)], maxlen=self.slots)

    def record(self, error: ConvoyError | None, seconds: float) -> None:
        kind = self.objective.kind
        if kind is Kind.AVAILABILITY:
            if error is None:
                self.good += 1
            elif counts_for_availability(error):
                self.bad += 1
        elif kind is Kind.LATENCY and error is None:  # failures spend the availability budget
            threshold = self.objective.threshold_ms
            assert threshold is not None
            if seconds * 1000.0 > threshold:
                self.bad += 1
            else:
                self.good += 1

    def burn_rate(self, slots_back: int) -> float:
        """Bad share of the events since the snapshot `slots_back` intervals ago (the
        oldest one while the server is younger than that), over the budget; 0 without
        events."""
        good, bad = self.history[max(0, len(self.history) - max(1, slots_back))]
        events = (self.good - good) + (self.bad - bad)
        if events <= 0:
            return 0.0
        return ((self.bad - bad) / events) / self.objective.budget


class SloTracker:
    """Every model's objectives, counted and read. Lives on the event loop (no lock):
    observe(), tick() and the readers run there; a scrape reads `readings`, a tuple
    replaced whole by tick()."""

    def __init__(
        self,
        declared: dict[str, ModelObjectives],
        *,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 10.0,
    ) -> None:
        self.declared = declared
        self._clock = clock
        self._interval_s = interval_s
        slots = int(max(s for _, s in BURN_WINDOWS) / interval_s) + 1
        self._counts: dict[str, list[ObjectiveCounts]] = {
            model: [
                ObjectiveCounts(model, o, slots)
                for o in d.objectives
                if o.kind is not Kind.QUALITY  # read from the drift monitor's counters
            ]
            for model, d in declared.items()
        }
        self._next_snapshot = clock() + interval_s
        self.burning: dict[str, str] = {}  # model -> why its background work is shed
        self.shed: dict[tuple[str, str], int] = {}  # (model, reason) -> requests shed
        self.readings: tuple[SloReading, ...] = ()
        self.tick()

    def objectives(self, model: str) -> ModelObjectives | None:
        return self.declared.get(model)

    def observe(self, answered: AnsweredRequest) -> None:
        """The path's answer observer: callers' requests only (a shadow copy, a replay,
        a batch job is background work: neither good nor bad for the model's users)."""
        counts = self._counts.get(answered.served.spec.name)
        if not counts or answered.arm == "shadow":
            return
        request = answered.request
        if request is not None and request.background:
            return
        # Server-side request time: arrival to answer (cache hits included), as
        # convoy_request_seconds; the rollout window's queue + compute is the same span.
        seconds = (answered.done_ns - request.arrival_ns) / 1e9 if request is not None else 0.0
        for objective in counts:
            objective.record(answered.error, seconds)

    def record_refused(self, model: str, error: ConvoyError, background: bool) -> None:
        """A caller's request that failed before a version was picked (the model not
        loaded, its load failed or outlasted the wait): no answer observer hears of it,
        yet a model that is down must burn its availability budget. Counted as observe()
        counts a failure: server-side failures only, callers' requests only."""
        if background or not is_server_failure(error):
            return
        for objective in self._counts.get(model, ()):
            if objective.objective.kind is Kind.AVAILABILITY:
                objective.bad += 1

    def tick(self) -> None:
        """Take the snapshots that are due, then recompute burn rates and the fast-burn
        condition (once a second: cheap, a few subtractions per objective)."""
        now = self._clock()
        while now >= self._next_snapshot:
            for counts in self._all():
                counts.history.append((counts.good, counts.bad))
            self._next_snapshot += self._interval_s
        readings = []
        burning: dict[str, str] = {}
        for counts in self._all():
            rates = {
                name: counts.burn_rate(int(seconds / self._interval_s))
                for name, seconds in BURN_WINDOWS
            }
            readings.append(
                SloReading(
                    counts.model,
                    counts.objective.name,
                    counts.objective.ratio,
                    SloCounts(counts.good, counts.bad, rates),
                )
            )
            if counts.model not in burning and all(rates[w] > FAST_BURN for w in FAST_WINDOWS):
                figures = ", ".join(f"{rates[w]:.1f}x over {w}" for w in FAST_WINDOWS)
                burning[counts.model] = (
                    f"SLO '{counts.objective.name}' burns its error budget fast ({figures}; "
                    f"over {FAST_BURN:g}x)"
                )
        for model, declared in self.declared.items():  # the target alone: Prometheus counts
            for objective in declared.objectives:
                if objective.kind is Kind.QUALITY:
                    readings.append(SloReading(model, objective.name, objective.ratio, None))
        self.readings = tuple(readings)
        self.burning = burning

    def refuse_background(self, model: str) -> ConvoyError | None:
        """UNAVAILABLE (retried later by replays and batch jobs) for background work on a
        model in fast burn, counted; None otherwise."""
        why = self.burning.get(model)
        if why is None:
            return None
        key = (model, SHED_REASON)
        self.shed[key] = self.shed.get(key, 0) + 1
        return Unavailable(f"model '{model}': background work shed while its {why}")

    def _all(self) -> Iterable[ObjectiveCounts]:
        for counts in self._counts.values():
            yield from counts
