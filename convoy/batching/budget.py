"""ShareBudget: the share of a resource's time that background work (batch jobs, replays,
shadow copies) may take while callers are about, as a token bucket driven by an injected
clock. Two resources are budgeted (DESIGN §13, issue 27):

- the server's event loop (`--background-loop-share`, inference/background.py): each
  background request's decoding, queueing, encoding and gRPC work, which a caller that
  arrives meanwhile waits behind;
- a model's instances (`--background-compute-share`, batching/queue.py): each background
  batch's run, which on shared cores (or a shared GPU) slows the callers' batches that run
  beside it, however the queue orders them.

Callers are about when a request that is not background arrived in the last
CALLERS_RECENT_NS. With none about the bucket stays full and nothing waits: a job alone
runs at full speed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], int]  # monotonic nanoseconds

# How long after a caller's request background work stays paced.
CALLERS_RECENT_NS = 1_000_000_000


def check_share(value: float) -> float:
    """The share itself, or ValueError saying what it must be (the flags' check)."""
    if not 0 < value <= 1:  # NaN too
        raise ValueError(f"must be above 0 and at most 1, got {value:g}")
    return value


def parse_share(text: str) -> float:
    """The argparse type of the `--background-*-share` flags."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number") from None
    return check_share(value)


@dataclass
class ShareBudget:
    """A token bucket over a resource's time, in nanoseconds: it fills at `share` of the
    wall time while callers are about, up to `burst_ns`, and background work's time is
    taken from it; in debt, the next background work waits until the debt is paid. No
    caller about: always full, no wait, no charge. Lives on the event loop (no lock)."""

    share: float
    burst_ns: int
    clock: Clock = time.monotonic_ns
    callers_seen_ns: int = field(default=-CALLERS_RECENT_NS - 1, init=False)
    level_ns: float = field(default=0.0, init=False)
    stamp_ns: int = field(default=0, init=False)
    charged_ns: int = field(default=0, init=False)  # every charge, callers about or not

    def __post_init__(self) -> None:
        check_share(self.share)
        self.level_ns = self.burst_ns
        self.stamp_ns = self.clock()

    def caller_arrived(self, now: int | None = None) -> None:
        """A caller's request (not background): the only per-caller cost, one clock read
        (none where the caller has read it)."""
        self.callers_seen_ns = self.clock() if now is None else now

    def delay_ns(self, now: int | None = None) -> int:
        """How long the next background work should wait: 0 without callers about or
        without debt; else until the debt is paid, or until the callers have gone."""
        now = self.clock() if now is None else now
        if not self._refill(now) or self.level_ns >= 0:
            return 0
        owed = math.ceil(-self.level_ns / self.share)
        return min(owed, self.callers_seen_ns + CALLERS_RECENT_NS + 1 - now)

    def charge(self, spent_ns: int) -> None:
        """Background work spent `spent_ns` of the resource's time."""
        self.charged_ns += spent_ns
        if self._refill(self.clock()):
            self.level_ns -= spent_ns

    def _refill(self, now: int) -> bool:
        """Fill up to `now`; False (and full) while no caller is about."""
        if now - self.callers_seen_ns > CALLERS_RECENT_NS:
            self.level_ns, self.stamp_ns = self.burst_ns, now
            return False
        self.level_ns = min(self.burst_ns, self.level_ns + (now - self.stamp_ns) * self.share)
        self.stamp_ns = now
        return True
