"""What a door knows about a request that the request message itself does not carry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .admission import ANONYMOUS
from .codec import Place
from .cuda_shm import SharedMemory

if TYPE_CHECKING:
    from .tracing import RequestSpan


def _no_key() -> str | None:
    return None


def deadline_in(seconds: float | None) -> int | None:
    """The monotonic instant (time.monotonic_ns) `seconds` from now: a door's deadline,
    fixed once so that every wait after it (an on-demand load) spends it."""
    return None if seconds is None else time.monotonic_ns() + int(seconds * 1e9)


# Not frozen, though never changed: a frozen dataclass sets each field through
# object.__setattr__, 0.83 µs per construction against 0.19 µs (timeit, 7 fields, this
# machine), and one is built per request on the event loop.
@dataclass(slots=True)
class Caller:
    """One request's caller, as its door saw it.

    `transport`: grpc, http (batch, replay): the door; an ensemble's steps take their
    ensemble request's. `client` names the rate budget it is charged to
    (admission.client_id); None is the server's own work (an ensemble's step, a mirrored
    run), charged to no one: its request was admitted once, at its door. `header_key`
    reads the A/B key from the transport's headers, called only when a rollout needs
    one. `regions` holds inputs that a front-end process put in its own shared memory,
    and `place` may take large outputs there. `background` queues the work behind every
    caller (batch, replay). `traceparent`: the W3C header, read by the doors only while
    tracing is on; `span` is set by the tracing once the request is sampled.
    `deadline_ns`: when the caller stops waiting (time.monotonic_ns; None: never), set
    at the door (deadline_in) and tightened by the request's `timeout` parameter.
    """

    transport: str
    client: str | None = ANONYMOUS
    deadline_ns: int | None = None
    header_key: Callable[[], str | None] = _no_key
    regions: SharedMemory | None = None
    place: Place | None = None
    background: bool = False
    traceparent: str | None = None
    span: RequestSpan | None = None

    @property
    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, as of now (never below zero)."""
        if self.deadline_ns is None:
            return None
        return max(0.0, (self.deadline_ns - time.monotonic_ns()) / 1e9)
