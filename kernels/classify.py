"""Top-k classification, for Triton's `classification` output extension.

A requested output with parameter `classification: K` comes back as BYTES
[batch, K] holding "value:index" (or "value:index:label" when the model's
config gives the output a label_filename), highest value first, as Triton does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def topk_reference(
    scores: npt.NDArray[Any], k: int
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """The k largest values along the last axis, descending, with their indices."""
    flat = scores.reshape(-1, scores.shape[-1]) if scores.ndim > 1 else scores.reshape(1, -1)
    k = min(k, flat.shape[-1])
    part = np.argpartition(-flat, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(flat, part, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    indices = np.take_along_axis(part, order, axis=-1).astype(np.int64)
    values = np.take_along_axis(values, order, axis=-1)
    return values, indices


def topk_cuda(scores: object, k: int) -> tuple[object, object]:
    """GPU top-k on a torch CUDA tensor (same contract as the reference)."""
    import torch

    assert isinstance(scores, torch.Tensor) and scores.is_cuda
    flat = scores.reshape(-1, scores.shape[-1])
    values, indices = torch.topk(flat, min(k, flat.shape[-1]), dim=-1, largest=True, sorted=True)
    return values, indices


def format_classes(
    values: npt.NDArray[Any],
    indices: npt.NDArray[np.int64],
    labels: list[str] | None = None,
) -> npt.NDArray[np.object_]:
    """BYTES elements "value:index[:label]", shaped like `values`."""
    out = np.empty(values.shape, dtype=np.object_)
    for pos in np.ndindex(values.shape):
        index = int(indices[pos])
        text = f"{float(values[pos]):f}:{index}"
        if labels is not None and 0 <= index < len(labels):
            text += f":{labels[index]}"
        out[pos] = text.encode()
    return out


def classify(
    scores: npt.NDArray[Any], k: int, batched: bool, labels: list[str] | None = None
) -> npt.NDArray[np.object_]:
    """Triton's classification result for one request's output tensor."""
    if batched:
        rows = scores.reshape(scores.shape[0], -1)
        values, indices = topk_reference(rows, k)
        return format_classes(values, indices, labels)
    values, indices = topk_reference(scores.reshape(1, -1), k)
    return format_classes(values[0], indices[0], labels)
