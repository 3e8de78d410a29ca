"""Keeping the cyclic garbage collector's full collections off the request path.

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
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
