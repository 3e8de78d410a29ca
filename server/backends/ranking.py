"""Ranking outputs for Triton's classification extension.

Once per batch, on the model instance's thread (never on the event loop): with
numpy on the CPU, and on the instance's GPU, before anything is copied back,
where its backend keeps outputs there (the fused softmax + top-k kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.classify import topk_reference, topk_torch

from ..batching.request import Array, Ranked, Ranking


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


def rank_on_device(outputs: Mapping[str, Any], rankings: Mapping[str, Ranking]) -> dict[str, Any]:
    """torch tensors -> (values, indices) tensors on the same device, enqueued on the
    current stream; the caller copies them back with the other outputs."""
    ranked = {}
    for name, ask in rankings.items():
        value = outputs[name]
        rows, columns = rows_of(tuple(value.shape), ask)
        flat = value.reshape(rows, columns)
        if value.is_cuda and columns > 0:
            from kernels.triton_kernels import softmax_topk_triton

            ranked[name] = softmax_topk_triton(flat, ask.k, ask.softmax)
        else:
            ranked[name] = topk_torch(flat, ask.k, ask.softmax)
    return ranked


def _empty(rows: int) -> Ranked:
    return Ranked(np.zeros((rows, 0), np.float32), np.zeros((rows, 0), np.int64))
