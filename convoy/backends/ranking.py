"""Ranking outputs for Triton's classification extension.

Once per batch, on the model instance's thread (never on the event loop): with
numpy on the CPU, and on the instance's GPU, before anything is copied back,
where its backend keeps outputs there (the fused softmax + top-k kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from convoy.kernels.classify import topk_reference, topk_torch

from ..config import ModelSpec
from ..tensors import Array, Ranked, Ranking
from .stages import working_kernel

# (rows [R, N] tensor, k, softmax) -> (values [R, k] float32, indices [R, k] int64)
TopK = Callable[[Any, int, bool], tuple[Any, Any]]


def rows_of(shape: tuple[int, ...], ask: Ranking) -> tuple[int, int]:
    """The [rows, columns] view an output is ranked in."""
    size = int(np.prod(shape))
    rows = shape[0] if ask.per_row and shape else 1
    return rows, size // rows if rows else 0


def rank_on_host(
    outputs: Mapping[str, Array], rankings: Mapping[str, Ranking]
) -> dict[str, Ranked]:
    ranked = {}
    for name, ask in rankings.items():
        value = outputs[name]
        rows, columns = rows_of(value.shape, ask)
        if rows * columns == 0:
            ranked[name] = _empty(rows)
            continue
        values, indices = topk_reference(value.reshape(rows, columns), ask.k, ask.softmax)
        ranked[name] = Ranked(values.astype(np.float32, copy=False), indices)
    return ranked


def rank_on_device(
    outputs: Mapping[str, Any], rankings: Mapping[str, Ranking], topk: TopK = topk_torch
) -> dict[str, Any]:
    """torch tensors -> (values, indices) tensors on the same device, enqueued on the
    current stream; the caller copies them back with the other outputs."""
    ranked = {}
    for name, ask in rankings.items():
        value = outputs[name]
        rows, columns = rows_of(tuple(value.shape), ask)
        flat = value.reshape(rows, columns)
        ranked[name] = topk(flat, ask.k, ask.softmax) if columns else topk_torch(flat, 0)
    return ranked


@dataclass(frozen=True)
class RankedRows:
    """What the fused kernel is compiled for, per output a request may rank."""

    width: int  # columns of one ranked row
    softmax: bool


def ranked_rows(spec: ModelSpec) -> tuple[RankedRows, ...]:
    """The rows that classification can rank in `spec`'s outputs: every numeric output
    with fixed dims (a batched output per item, an unbatched one as one row, as
    rows_of does). Outputs with a -1 dim have no width to compile for in advance."""
    softmax = spec.softmax_outputs
    widths = {
        RankedRows(int(np.prod(t.dims)), t.name in softmax)
        for t in spec.outputs
        if t.datatype != "BYTES" and -1 not in t.dims
    }
    return tuple(sorted(widths, key=lambda r: (r.width, r.softmax)))


def device_topk(device: str, rows: Iterable[RankedRows] = (), dtypes: Iterable[Any] = ()) -> TopK:
    """The fused softmax + top-k Triton kernel where it works on `device`, else torch.

    The kernel compiles once per row width, softmax flag and score dtype, at its
    first launch: each of `rows` in each of `dtypes` (float32 always) is launched
    here, at model load, so no request waits for a compile. One that fails to
    compile makes the model rank with torch ops instead."""
    import torch

    shapes = [RankedRows(4, True), *rows]
    kinds = list(dict.fromkeys([torch.float32, *dtypes]))

    def load() -> TopK:
        from convoy.kernels.triton_kernels import softmax_topk_triton

        return softmax_topk_triton

    def probe(kernel: TopK) -> None:
        for shape in shapes:
            for dtype in kinds:
                kernel(torch.zeros((1, shape.width), dtype=dtype, device=device), 1, shape.softmax)

    return working_kernel("softmax_topk", device, load, topk_torch, probe)


def _empty(rows: int) -> Ranked:
    return Ranked(np.zeros((rows, 0), np.float32), np.zeros((rows, 0), np.int64))
