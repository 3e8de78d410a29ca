"""Admission: who the caller is, and whether its rate budget lets this request in.

One `RateBudget` per server, held by the inference path in the engine process: every
door charges the same buckets (gRPC, HTTP/REST, each front-end process, stream
messages one by one), so `--rate-limit` means the same whatever the number of front
ends or protocols. A caller is known by its bearer token where the server checks
tokens (`--auth-tokens`), else every caller is one anonymous client.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import RateLimited

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
        self.burst = burst or rate
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
