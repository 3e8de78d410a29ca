"""Keeping the cyclic garbage collector's full collections off the request path,
and measuring what the collector still costs (convoy_gc_pause_seconds).

Loaded models leave a quarter of a million long-lived objects (torch modules,
protobuf descriptors, tokenizers) in the collector's oldest generation, and every
full collection walks all of them with the event loop stopped: with the built-in
examples that was 60-140 ms, every few seconds under load, and it was the tiny
benchmark's p99.9. Once models are loaded, what is alive is frozen (gc.freeze:
moved to a permanent generation the collector skips), so full collections walk
only what serving allocated (0.5 ms measured). vLLM freezes its heap after start-up
for the same reason.

A frozen object that later becomes cyclic garbage (an unloaded model's instances)
is never collected while frozen, so after loads and unloads the heap is settled
again: unfrozen, collected once (one pause, at a moment an operator chose), frozen.
Settling waits for the repository to be quiet for a moment, so a burst of loads
costs one collection, not one each.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

QUIET_S = 1.0  # no load or unload for this long before a settle


@dataclass(frozen=True)
class Settled:
    frozen: int  # objects in the permanent generation now
    collected: int  # unreachable objects the collection found
    pause_ms: float  # how long the collection held the interpreter


def settle() -> Settled:
    """Unfreeze, collect everything once, freeze what survives. Blocking: it holds
    the GIL for the whole collection (call it when a pause is acceptable)."""
    start = time.perf_counter()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    return Settled(gc.get_freeze_count(), collected, (time.perf_counter() - start) * 1e3)


class HeapSettler:
    """Settles the heap once the repository has been quiet for `quiet_s`.

    `changed()` is called when a load or unload finishes; `busy()` says whether
    others are still in progress (then the settle waits for their end).
    """

    def __init__(
        self,
        busy: Callable[[], bool],
        quiet_s: float = QUIET_S,
        collect: Callable[[], Settled] = settle,
    ) -> None:
        self._busy = busy
        self._quiet_s = quiet_s
        self._collect = collect
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.last: Settled | None = None

    def changed(self) -> None:
        """A load or unload finished: settle after the quiet period (re-armed)."""
        if self._closed:
            return  # shutting down: the unloads of close() need no settle
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._quiet_s, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._busy():
            return  # the one still running calls changed() when it finishes
        self.now()

    def now(self) -> Settled:
        """Settle at once (start-up, before serving)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.last = self._collect()
        log.info(
            "heap settled: %d objects frozen, %d collected, %.0f ms",
            self.last.frozen,
            self.last.collected,
            self.last.pause_ms,
        )
        return self.last

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The buckets' `le` labels as Prometheus writes them, +Inf last.
BOUND_LABELS = [floatToGoString(b) for b in (*PAUSE_BUCKETS, math.inf)]  # type: ignore[no-untyped-call]


class GcPauses:
    """convoy_gc_pause_seconds{generation}: how long each collection held the
    interpreter (every thread waits, the event loop too), from gc.callbacks.

    The callback only adds to plain lists, and the histogram is made from them when it
    is scraped (a Collector): a collection can start inside any allocation, and so
    inside prometheus_client while it holds a lock. In its multiprocess mode every
    metric shares one lock that is not reentrant. An observe() from the callback then
    waited for its own thread, and a server hung at start-up (CI, with the mode set by
    an import of Feast: features/lookup.py).

    Collections never overlap (the collector runs under the GIL and refuses to
    re-enter), so one start time is enough. start() and close() belong to the
    server's lifecycle: gc.callbacks is the interpreter's, not ours to leave behind.
    """

    NAME = "convoy_gc_pause_seconds"
    HELP = "Time each garbage collection stopped the interpreter, by generation"

    def __init__(self, registry: CollectorRegistry) -> None:
        # Per generation: the pauses in each bucket (not cumulative; the last is +Inf).
        self._counts = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]
        self._sums = [0.0] * 3
        self._started = 0.0
        self._created = time.time()  # _created, as prometheus_client's Histogram has it
        registry.register(self)

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def snapshot(self) -> dict[str, tuple[list[float], float]]:
        """generation -> (cumulative count per bucket in PAUSE_BUCKETS, then +Inf; the
        sum of the pauses): what a front end sends the engine to export."""
        return {
            str(generation): (list(map(float, itertools.accumulate(counts))), total)
            for generation, (counts, total) in enumerate(zip(self._counts, self._sums, strict=True))
        }

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.NAME, self.HELP, labels=["generation"])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.NAME, self.HELP, labels=["generation"])
        for generation, (counts, total) in self.snapshot().items():
            family.add_metric([generation], list(zip(BOUND_LABELS, counts, strict=True)), total)
            created = {"generation": generation}
            family.samples.append(Sample(f"{self.NAME}_created", created, self._created))
        yield family

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        if 0 <= generation < len(self._counts):
            pause = time.perf_counter() - self._started
            self._counts[generation][bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1
            self._sums[generation] += pause
