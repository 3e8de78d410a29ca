"""The messages that travel between the frontend, the queue and the instances."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..tensors import Array, Ranked


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, Array]  # the outputs asked for in full
    ranked: dict[str, Ranked] = field(default_factory=dict)  # those asked for classification
    # Inputs the server added before the model ran (looked-up features): captured, not sent.
    added_inputs: dict[str, Array] = field(default_factory=dict)


@dataclass(eq=False)
class InferRequest:
    """One accepted request. Its future is resolved exactly once."""

    id: str
    inputs: dict[str, Array]  # batch dimension first when the model batches
    outputs: tuple[str, ...]  # output names the client wants
    rows: int  # this request's batch size (1 for models that do not batch)
    # (input name, shape past the batch dim) in the config's input order
    shape_key: tuple[tuple[str, tuple[int, ...]], ...]
    future: asyncio.Future[InferResult]
    arrival_ns: int = 0
    deadline_ns: int | None = None  # monotonic; None: no deadline
    priority: int = 0  # 1 is highest; 0 means the model's default
    queue_level: int = field(default=0, repr=False)  # set by the queue
    dispatch_ns: int = field(default=0, repr=False)  # set when its batch leaves the queue
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k
    settled: bool = field(default=False, repr=False)  # answered and counted (by the queue)
    # Work of the server's own (a rollout's comparison run): queued behind every caller.
    background: bool = False
    # A piece of a background request run in pieces (ServedModel.infer): counted once, as
    # the whole request, not piece by piece.
    piece: bool = field(default=False, repr=False)
    # An ensemble's A/B key and door, kept for its steps (the headers are gone by then):
    # a step routes by the key, and its captured row names the door.
    ab_key: str | None = field(default=None, repr=False)
    transport: str = field(default="", repr=False)
    # Tracing on and this request sampled: its span (inference/tracing.RequestSpan), which
    # the span of the batch it runs in links to. None otherwise.
    trace: object | None = field(default=None, repr=False)

    @property
    def abandoned(self) -> bool:
        """True once the caller has stopped waiting (cancelled) or been answered."""
        return self.future.done()
