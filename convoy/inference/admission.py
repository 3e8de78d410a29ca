"""Admission: who the caller is, and whether its rate budget lets this request in.

One `RateBudget` per server, held by the inference path in the engine process: every
door charges the same buckets (gRPC, HTTP/REST, each front-end process, stream
messages one by one), so `--rate-limit` means the same whatever the number of front
ends or protocols. A caller is known by its bearer token where the server checks
tokens (`--auth-tokens`), else every caller is one anonymous client.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import RateLimited, Unavailable

ANONYMOUS = "anonymous"


def client_id(token: str | None) -> str:
    """The name a caller's budget is kept under: a digest of its token (a token itself
    never sits in the server's tables, logs or captured rows), or ANONYMOUS."""
    if token is None:
        return ANONYMOUS
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.burst

    def take(self, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


class RateBudget:
    """Token buckets per client: `rate` requests per second, bursts up to `burst`.
    Lives on the event loop (no lock): every charge comes from the loop."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        # At least one token: a bucket that can never hold one refuses every request
        # (--rate-limit 0.5 means one request every two seconds, not none).
        self.burst = max(1.0, burst or rate)
        self._buckets: dict[str, TokenBucket] = {}
        self._clock = clock

    def admit(self, client: str) -> None:
        """Charge one request to `client`; RateLimited (RESOURCE_EXHAUSTED, HTTP 429)
        when its bucket is empty."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, stamp=now)
        if not bucket.take(now):
            raise RateLimited(f"rate limit of {self.rate:g} requests/s exceeded for this client")


# At most this long (and half the grace period) between SIGTERM's first refusals and the
# transport's stop, for callers to take their UNAVAILABLE elsewhere.
DRAIN_SETTLE_MAX_S = 2.0


class Draining:
    """A server's refusals while it drains (SIGTERM): new inferences are answered
    UNAVAILABLE, which clients' retry policies retry, until callers have stopped coming;
    only then may the transport stop. gRPC's shutdown cancels the calls it has received
    but not yet handed to a handler: CANCELLED, which no retry policy retries."""

    QUIET_S = 0.1  # no refusal for this long: the callers have gone elsewhere

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.on = False
        self.last_refusal = -1.0
        self._clock = clock

    def start(self) -> None:
        """From now on, refuse. Counted as a refusal: calls on their way when the signal
        came are not seen yet, so settle() waits QUIET_S for them at least."""
        self.on = True
        self.last_refusal = self._clock()

    def refuse(self, what: str = "the server") -> Unavailable:
        self.last_refusal = self._clock()
        return Unavailable(f"{what} is shutting down; retry on another replica")

    async def settle(self, bound_s: float) -> None:
        """Wait, at most `bound_s`, until no call has been refused for QUIET_S."""
        end = self._clock() + max(0.0, bound_s)
        while True:  # a clock to watch, no event to wait for
            now = self._clock()
            if now >= end or now - self.last_refusal >= self.QUIET_S:
                return
            await asyncio.sleep(self.QUIET_S / 4)
