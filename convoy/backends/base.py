"""The Backend protocol and the capabilities a runtime may add to it.

A backend instance belongs to exactly one model instance and is only ever
called from that instance's thread, so implementations need no locking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..config import TensorSpec
from ..errors import ConvoyError, InvalidInput
from ..tensors import Ranked, Ranking

Array = npt.NDArray[np.generic]


@dataclass(frozen=True)
class BackendSignature:
    """Inputs and outputs as the model file declares them (dims include any batch dim)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_dim_dynamic: bool


class Backend(Protocol):
    device: str  # "cpu" or "cuda:N": the label on metrics

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """Run one batch; blocking, called on the instance's own thread."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StagesInputs(Protocol):
    """A GPU backend with per-instance pinned buffers that batches are gathered in."""

    def input_buffer(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> Array | None: ...


@dataclass(frozen=True)
class RequestInputs:
    """One request of a batch as a per-request backend sees it."""

    id: str
    inputs: Mapping[str, Array]  # batch dim first for a batching model, as decoded
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class AddedInputs:
    """A request's outputs, plus inputs the backend added to it before running the model
    (features from a feature store): captured with the request, as the model saw them."""

    outputs: dict[str, Array]
    inputs: dict[str, Array]


@runtime_checkable
class RunsRequests(Protocol):
    """A backend that runs a batch as its separate requests (Triton's python backend)
    and answers each one: its outputs, or the error that fails that request alone.
    Raising fails all of them."""

    def run_requests(
        self, requests: Sequence[RequestInputs]
    ) -> list[dict[str, Array] | AddedInputs | ConvoyError]: ...


@runtime_checkable
class RanksOnDevice(Protocol):
    """A GPU backend that ranks outputs for classification before copying them back,
    so only the top-k of an output asked for nothing else crosses the bus."""

    def run_ranked(
        self,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Array], dict[str, Ranked]]:
        """Like run, plus the rankings; `output_names` are those wanted in full."""
        ...


@dataclass(frozen=True)
class ShapeRange:
    """The shapes a runtime accepts for one input, per item (past any batch dim):
    every dim within min..max (a TensorRT optimisation profile)."""

    min: tuple[int, ...]
    max: tuple[int, ...]

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """InvalidInput, naming the input and the range, for a shape outside it."""
        fits = len(shape) == len(self.min) and all(
            low <= dim <= high for low, dim, high in zip(self.min, shape, self.max, strict=True)
        )
        if not fits:
            raise InvalidInput(
                f"input '{name}': shape {list(shape)} is outside the model's optimisation "
                f"profile (min {list(self.min)}, max {list(self.max)} per item)"
            )


@runtime_checkable
class BoundsInputs(Protocol):
    """A runtime that fails a batch holding an input shape outside fixed bounds."""

    def input_bounds(self) -> dict[str, ShapeRange]:
        """Per request input name, the item shapes it accepts (inputs it does not bound,
        or that a stage in front reshapes, are absent)."""
        ...


def input_bounds(backend: object) -> dict[str, ShapeRange]:
    """What a loaded backend accepts per input, to refuse a request at decode rather than
    fail its whole batch; {} for a backend that takes any shape its config allows."""
    return backend.input_bounds() if isinstance(backend, BoundsInputs) else {}


def check_input_bounds(
    bounds: Mapping[str, ShapeRange], name: str, item_shape: tuple[int, ...]
) -> None:
    """InvalidInput where input `name`'s shape is out of bounds. `item_shape` is the
    request's shape past the batch dim for a batched model, the whole shape otherwise."""
    allowed = bounds.get(name)
    if allowed is not None:
        allowed.check(name, item_shape)


def default_threads(instances: int) -> int:
    """Intra-op threads per instance so that all instances together fill the cores once."""
    return max(1, (os.cpu_count() or 1) // max(1, instances))
