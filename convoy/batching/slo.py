"""Latency-SLO batching: adapt queue delay and batch size online to a p99 target.

Triton's dynamic batcher uses the fixed max_queue_delay and max_batch_size it
is given. With `parameters { key: "latency_slo_p99_ms" ... }` Convoy instead
treats those as ceilings and steers below them: it measures the end-to-end
p99 of the last window of requests and, AIMD-style, backs off multiplicatively
when p99 exceeds the target and grows additively while p99 sits comfortably
below it. Bigger batches and longer waits buy throughput; the target caps the
latency they may cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOW = 256  # requests per decision
HEADROOM = 0.7  # grow only while p99 < HEADROOM * target
BACKOFF = 0.7  # multiplicative decrease on a miss


@dataclass(frozen=True)
class SloState:
    target_ns: int
    batch_limit: int
    delay_ns: int
    last_p99_ns: int


class SloController:
    """Pure state machine: feed latencies, read limits. The queue owns one."""

    def __init__(self, target_ns: int, max_batch_size: int, max_delay_ns: int) -> None:
        if target_ns <= 0:
            raise ValueError("the latency target must be positive")
        self.target_ns = target_ns
        self.max_batch = max(1, max_batch_size)
        # Waiting longer than half the target can never pay off.
        self.max_delay_ns = min(max_delay_ns or target_ns // 2, target_ns // 2)
        self.batch_limit = self.max_batch
        self.delay_ns = min(self.max_delay_ns, target_ns // 10)
        self.last_p99_ns = 0
        self._window = np.empty(WINDOW, dtype=np.int64)
        self._filled = 0
        self._step_ns = max(1, target_ns // 20)

    def observe(self, latency_ns: int) -> bool:
        """Record one request; True when the limits changed."""
        self._window[self._filled] = latency_ns
        self._filled += 1
        if self._filled < WINDOW:
            return False
        self._filled = 0
        return self._decide(int(np.percentile(self._window, 99)))

    def _decide(self, p99: int) -> bool:
        self.last_p99_ns = p99
        before = (self.batch_limit, self.delay_ns)
        if p99 > self.target_ns:
            self.delay_ns = int(self.delay_ns * BACKOFF * 0.5)
            self.batch_limit = max(1, int(self.batch_limit * BACKOFF))
        elif p99 < HEADROOM * self.target_ns:
            self.delay_ns = min(self.max_delay_ns, self.delay_ns + self._step_ns)
            self.batch_limit = min(self.max_batch, self.batch_limit + max(1, self.batch_limit // 8))
        return (self.batch_limit, self.delay_ns) != before

    def state(self) -> SloState:
        return SloState(self.target_ns, self.batch_limit, self.delay_ns, self.last_p99_ns)
