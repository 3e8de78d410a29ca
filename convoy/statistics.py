"""Per model-version counters in the shape of Triton's ModelStatistics, plus the
distributions Prometheus exports (read at scrape time by metrics.ModelSeriesCollector,
so each request is counted once).

Updated on the event loop only (by the queue's observer), so no locking.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class Histogram:
    """Prometheus histogram counts without prometheus_client's per-observation locks:
    one bisect and two additions. counts[i] holds observations in (bounds[i-1],
    bounds[i]]; the last one those above every bound (+Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def absorb(self, other: Histogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.sum += other.sum


def latency_histogram() -> Histogram:
    return Histogram(LATENCY_BUCKETS)


def batch_histogram() -> Histogram:
    return Histogram(BATCH_BUCKETS)


@dataclass
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    name: str
    version: str
    last_inference_ms: int = 0  # wall clock, as Triton reports it
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches run
    success: Duration = field(default_factory=Duration)  # end to end, per request
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batch_stats: dict[int, BatchSizeStats] = field(default_factory=dict)
    # What Prometheus needs beyond Triton's fields: distributions and failure reasons.
    request_seconds: Histogram = field(default_factory=latency_histogram)  # successes
    queue_seconds: Histogram = field(default_factory=latency_histogram)
    batch_rows: Histogram = field(default_factory=batch_histogram)  # batches run by instances
    compute_seconds: dict[str, Histogram] = field(default_factory=dict)  # device -> per batch
    failures: dict[str, int] = field(default_factory=dict)  # error class name -> requests

    def record_batch(
        self,
        rows: int,
        requests: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        device: str | None = None,
    ) -> None:
        """One batch run; `device` names the instance's device where one ran it (an
        ensemble's steps are counted by the models they ran on)."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        # Triton counts compute phases once per request in inference_stats
        # and once per batch in batch_stats.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        by_size = self.batch_stats.get(rows)
        if by_size is None:
            by_size = self.batch_stats[rows] = BatchSizeStats()
        by_size.compute_input.add(input_ns)
        by_size.compute_infer.add(infer_ns)
        by_size.compute_output.add(output_ns)
        if device is not None:
            self.batch_rows.observe(rows)
            compute = self.compute_seconds.get(device)
            if compute is None:
                compute = self.compute_seconds[device] = latency_histogram()
            compute.observe((input_ns + infer_ns + output_ns) / 1e9)

    def absorb(self, other: ModelStatistics) -> None:
        """Add another version's counts to these (what Prometheus keeps of a version
        that was unloaded or replaced)."""
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for mine, theirs in (
            (self.success, other.success),
            (self.fail, other.fail),
            (self.queue, other.queue),
            (self.compute_input, other.compute_input),
            (self.compute_infer, other.compute_infer),
            (self.compute_output, other.compute_output),
        ):
            mine.add(theirs.ns, theirs.count)
        for rows, per in other.batch_stats.items():
            by_size = self.batch_stats.setdefault(rows, BatchSizeStats())
            by_size.compute_input.add(per.compute_input.ns, per.compute_input.count)
            by_size.compute_infer.add(per.compute_infer.ns, per.compute_infer.count)
            by_size.compute_output.add(per.compute_output.ns, per.compute_output.count)
        self.request_seconds.absorb(other.request_seconds)
        self.queue_seconds.absorb(other.queue_seconds)
        self.batch_rows.absorb(other.batch_rows)
        for device, histogram in other.compute_seconds.items():
            self.compute_seconds.setdefault(device, latency_histogram()).absorb(histogram)
        for reason, count in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + count

    def record_request(
        self, ok: bool, total_ns: int, queue_ns: int | None, reason: str | None = None
    ) -> None:
        """One answered request; `reason` (the error's class name) labels a failure
        for Prometheus where the caller counts it here rather than directly."""
        if ok:
            self.success.add(total_ns)
            self.request_seconds.observe(total_ns / 1e9)
        else:
            self.fail.add(total_ns)
            if reason is not None:
                self.failures[reason] = self.failures.get(reason, 0) + 1
        if queue_ns is not None:
            self.queue.add(queue_ns)
            self.queue_seconds.observe(queue_ns / 1e9)
