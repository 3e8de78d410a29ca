"""Batch formation as a pure function of the queue and the clock.

Kept free of asyncio so it can be tested exhaustively with a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .request import InferRequest


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int  # 0: the model has no batch dimension
    dynamic: bool  # dynamic_batching is configured
    max_delay_ns: int = 0
    preferred: tuple[int, ...] = ()  # ascending


@dataclass(frozen=True)
class BatchPlan:
    take: tuple[InferRequest, ...]  # empty: nothing to run yet
    wake_at_ns: int | None = None  # re-plan at this time if nothing arrives first


WAIT = BatchPlan(take=())


def plan_batch(pending: Iterable[InferRequest], now_ns: int, limits: BatchLimits) -> BatchPlan:
    """Choose the next batch from `pending` (highest priority first, oldest first).

    The head request always goes in the batch; later requests join it only if
    their per-item shapes match, so a batch never mixes incompatible shapes.
    Dispatch happens at once when the batch reaches max_batch_size or the
    largest preferred size (cut back to the largest preferred size it can fill
    exactly), else with whatever is there once the head has waited
    max_queue_delay.
    """
    iterator = iter(pending)
    head = next(iterator, None)
    if head is None:
        return WAIT
    if limits.max_batch_size == 0 or not limits.dynamic:
        return BatchPlan(take=(head,))

    take = [head]
    rows = head.rows
    prefix_rows = [rows]
    full = False  # the next compatible request does not fit: waiting cannot help
    for request in iterator:
        if request.shape_key != head.shape_key:
            continue
        if rows + request.rows > limits.max_batch_size:
            full = True
            break
        take.append(request)
        rows += request.rows
        prefix_rows.append(rows)
        if rows == limits.max_batch_size:
            break

    if full or rows >= limits.max_batch_size:
        return BatchPlan(take=tuple(take))
    if limits.preferred and rows >= limits.preferred[-1]:
        # Cut at the largest preferred size the queue can fill exactly.
        for count in range(len(take), 0, -1):
            if prefix_rows[count - 1] in limits.preferred:
                return BatchPlan(take=tuple(take[:count]))
        return BatchPlan(take=tuple(take))
    deadline = head.arrival_ns + limits.max_delay_ns
    if now_ns >= deadline:
        return BatchPlan(take=tuple(take))
    return BatchPlan(take=(), wake_at_ns=deadline)
