"""A formed batch: gathering inputs into one buffer and splitting outputs back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InternalError
from ..tensors import Array, Ranked
from .request import InferRequest, InferResult

# (input name, shape, dtype) -> a writable buffer to gather that input in, or None.
BufferSource = Callable[[str, tuple[int, ...], np.dtype[Any]], Array | None]


@dataclass(frozen=True)
class Batch:
    requests: tuple[InferRequest, ...]
    batched: bool  # the model has a batch dimension

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Outputs some request wants in full (not only its classification)."""
        names: dict[str, None] = {}
        for request in self.requests:
            names.update(
                dict.fromkeys(n for n in request.outputs if n not in request.classification)
            )
        return tuple(names)

    @property
    def classification(self) -> dict[str, int]:
        """Output -> the largest top-k any request asks of it: ranked once per batch."""
        wanted: dict[str, int] = {}
        for request in self.requests:
            for name, k in request.classification.items():
                wanted[name] = max(k, wanted.get(name, 0))
        return wanted

    def gather_inputs(self, into: BufferSource | None = None) -> dict[str, Array]:
        """One contiguous array per input. Blocking copy: call it off the event loop.

        `into` may hand out a buffer to gather an input in (a GPU instance's pinned
        staging memory); without one, a batch of one request passes its zero-copy
        views of the request bytes straight through.
        """
        if into is None and len(self.requests) == 1:
            return dict(self.requests[0].inputs)
        gathered: dict[str, Array] = {}
        for name, first in self.requests[0].inputs.items():
            parts = [r.inputs[name] for r in self.requests]
            shape = first.shape
            if len(parts) > 1:
                shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
            buffer = into(name, shape, first.dtype) if into is not None else None
            if buffer is None:
                gathered[name] = first if len(parts) == 1 else np.concatenate(parts, axis=0)
            elif len(parts) == 1:
                np.copyto(buffer, first)
                gathered[name] = buffer
            else:
                gathered[name] = np.concatenate(parts, axis=0, out=buffer)
        return gathered

    def split_outputs(
        self, outputs: Mapping[str, Array], ranked: Mapping[str, Ranked] | None = None
    ) -> list[InferResult]:
        """Per-request views of the batch outputs, each limited to what it asked for."""
        ranked = ranked or {}
        if not self.batched or len(self.requests) == 1:
            return [_result(r, outputs, ranked) for r in self.requests]
        rows = self.rows
        tensors: list[tuple[str, Array | Ranked]] = [*outputs.items(), *ranked.items()]
        for name, value in tensors:
            first = value.values if isinstance(value, Ranked) else value
            if first.ndim == 0 or first.shape[0] != rows:
                raise InternalError(
                    f"output '{name}' has shape {list(first.shape)}; "
                    f"expected a batch dimension of {rows}"
                )
        split: list[InferResult] = []
        start = 0
        for request in self.requests:
            end = start + request.rows
            split.append(
                InferResult(
                    {
                        n: outputs[n][start:end]
                        for n in request.outputs
                        if n not in request.classification
                    },
                    {n: ranked[n].rows(start, end) for n in request.classification},
                )
            )
            start = end
        return split


def _result(
    request: InferRequest, outputs: Mapping[str, Array], ranked: Mapping[str, Ranked]
) -> InferResult:
    return InferResult(
        {n: outputs[n] for n in request.outputs if n not in request.classification},
        {n: ranked[n] for n in request.classification},
    )
