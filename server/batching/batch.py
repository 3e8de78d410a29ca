"""A formed batch: gathering inputs into one buffer and splitting outputs back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import InternalError
from .request import Array, InferRequest


@dataclass(frozen=True)
class Batch:
    requests: tuple[InferRequest, ...]
    batched: bool  # the model has a batch dimension

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)

    @property
    def output_names(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for request in self.requests:
            names.update(dict.fromkeys(request.outputs))
        return tuple(names)

    def gather_inputs(self) -> dict[str, Array]:
        """One contiguous array per input. Blocking copy: call it off the event loop.

        A batch of one request passes its (zero-copy) arrays straight through.
        """
        if len(self.requests) == 1:
            return dict(self.requests[0].inputs)
        first = self.requests[0].inputs
        return {
            name: np.concatenate([r.inputs[name] for r in self.requests], axis=0) for name in first
        }

    def split_outputs(self, outputs: Mapping[str, Array]) -> list[dict[str, Array]]:
        """Per-request views of the batch outputs, each limited to what it asked for."""
        if not self.batched or len(self.requests) == 1:
            return [{name: outputs[name] for name in r.outputs} for r in self.requests]
        rows = self.rows
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != rows:
                raise InternalError(
                    f"output '{name}' has shape {list(value.shape)}; "
                    f"expected a batch dimension of {rows}"
                )
        split: list[dict[str, Array]] = []
        start = 0
        for request in self.requests:
            end = start + request.rows
            split.append({name: outputs[name][start:end] for name in request.outputs})
            start = end
        return split
