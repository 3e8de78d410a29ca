"""The messages that travel between the frontend, the queue and the instances."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, Array]


@dataclass(eq=False)
class InferRequest:
    """One accepted request. Its future is resolved exactly once."""

    id: str
    inputs: dict[str, Array]  # batch dimension first when the model batches
    outputs: tuple[str, ...]  # output names the client wants
    rows: int  # this request's batch size (1 for models that do not batch)
    shape_key: tuple[tuple[int, ...], ...]  # per-input shapes past the batch dim
    future: asyncio.Future[InferResult]
    arrival_ns: int = 0
    deadline_ns: int | None = None  # monotonic; None: no deadline
    priority: int = 0  # 1 is highest; 0 means the model's default
    queue_level: int = field(default=0, repr=False)  # set by the queue
    dispatch_ns: int = field(default=0, repr=False)  # set when its batch leaves the queue
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k

    @property
    def abandoned(self) -> bool:
        """True once the caller has stopped waiting (cancelled) or been answered."""
        return self.future.done()
