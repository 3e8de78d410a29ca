"""Softmax + top-k for classifiers, and Triton's `classification` output extension.

A requested output with parameter `classification: K` comes back as BYTES
[batch, K] holding "value:index" (or "value:index:label" when the model's
config gives the output a label_filename), highest value first, as Triton does.
A model may opt into softmax (config parameter `classification_softmax`), and
the values are then probabilities instead of raw scores.

The ranking runs once per batch on the model instance (on its GPU where it has
one: convoy/kernels/triton_kernels.py), the formatting per request in the frontend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


def softmax_reference(scores: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Softmax along the last axis, in float32, stable against large scores."""
    shifted = scores.astype(np.float32) - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities


def topk_reference(
    scores: npt.NDArray[Any], k: int, softmax: bool = False
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """The k largest values of each row (the last axis), descending, with their
    indices; ties go to the lower index. With `softmax`, the values are the rows'
    softmax probabilities (the order is the same as the scores')."""
    flat = scores.reshape(-1, scores.shape[-1]) if scores.ndim > 1 else scores.reshape(1, -1)
    k = min(k, flat.shape[-1])
    part = np.argpartition(-flat, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(flat, part, axis=-1)
    order = np.lexsort((part, -values), axis=-1)
    indices = np.take_along_axis(part, order, axis=-1).astype(np.int64)
    values = np.take_along_axis(values, order, axis=-1)
    if softmax:
        row_max = flat.max(axis=-1, keepdims=True).astype(np.float32)
        total = np.exp(flat.astype(np.float32) - row_max).sum(axis=-1, keepdims=True)
        values = np.exp(values.astype(np.float32) - row_max) / total
    return values, indices


def topk_torch(scores: Any, k: int, softmax: bool = False) -> tuple[Any, Any]:
    """The same on a torch tensor of rows (any device): the fallback for rows too
    wide for the fused kernel's one-program-per-row layout."""
    import torch

    assert isinstance(scores, torch.Tensor)
    flat = scores.reshape(-1, scores.shape[-1]).float()
    if softmax:
        flat = torch.softmax(flat, dim=-1)
    values, indices = torch.topk(flat, min(k, flat.shape[-1]), dim=-1, largest=True, sorted=True)
    return values, indices


def format_classes(
    values: npt.NDArray[Any],
    indices: npt.NDArray[Any],
    labels: Sequence[str] | None = None,
) -> npt.NDArray[np.object_]:
    """BYTES elements "value:index[:label]", shaped like `values`, the value as
    Python's f"{value:f}" writes it. This runs on the event loop for rows x k
    elements: the elements are formatted into one string, encoded once and split
    once (measured 2x faster than an encode per element; numpy's string ufuncs were
    slower still, their int-to-str cast and encode cost more than Python's)."""
    floats = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
    ints = np.asarray(indices).reshape(-1).astype(np.int64).tolist()
    out = np.empty(len(floats), dtype=np.object_)
    texts = _texts(floats, ints, labels)
    parts = "\n".join(texts).encode().split(b"\n") if texts else []
    if len(parts) != len(texts):  # a label holds the separator itself
        parts = [text.encode() for text in texts]
    out[:] = parts
    shaped: npt.NDArray[np.object_] = out.reshape(np.shape(values))
    return shaped


def _texts(floats: list[float], ints: list[int], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return list(map("%f:%d".__mod__, zip(floats, ints, strict=True)))
    n = len(labels)
    return [
        f"{v:f}:{i}:{labels[i]}" if 0 <= i < n else f"{v:f}:{i}"
        for v, i in zip(floats, ints, strict=True)
    ]
