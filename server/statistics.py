"""Per model-version counters in the shape of Triton's ModelStatistics.

Updated on the event loop only (by the queue's observer), so no locking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


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

    def record_batch(
        self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        # Triton counts compute phases once per request in inference_stats
        # and once per batch in batch_stats.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        by_size = self.batch_stats.setdefault(rows, BatchSizeStats())
        by_size.compute_input.add(input_ns)
        by_size.compute_infer.add(infer_ns)
        by_size.compute_output.add(output_ns)

    def record_request(self, ok: bool, total_ns: int, queue_ns: int | None) -> None:
        (self.success if ok else self.fail).add(total_ns)
        if queue_ns is not None:
            self.queue.add(queue_ns)
