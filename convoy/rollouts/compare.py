"""Output divergence between two versions' answers to the same request.

Per output: the largest absolute difference (what the divergence gate reads:
y=3x against y=2x shows there, while cosine similarity, blind to scale, does
not), cosine similarity for float vectors (direction: embeddings), and top-1
agreement for classification scores (the decision a user sees).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]


@dataclass(frozen=True)
class OutputDivergence:
    max_abs_diff: float  # inf when shapes, kinds or non-numeric values differ
    cosine: float | None  # the lowest per-row cosine similarity; float outputs only
    top1_rows: int  # rows compared by argmax (float outputs of 2+ dims, 2+ classes)
    top1_agreed: int

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agreed / self.top1_rows if self.top1_rows else None


MISMATCH = OutputDivergence(math.inf, None, 0, 0)


def compare_outputs(
    reference: Mapping[str, Array], candidate: Mapping[str, Array]
) -> dict[str, OutputDivergence]:
    """One record per output of `reference`; an output the candidate lacks is a mismatch."""
    result: dict[str, OutputDivergence] = {}
    for name, ref in reference.items():
        other = candidate.get(name)
        result[name] = MISMATCH if other is None else compare_arrays(ref, other)
    return result


def divergence_score(divergences: Mapping[str, OutputDivergence]) -> float:
    """The figure the max_divergence gate compares: the worst output's max abs diff."""
    return max((d.max_abs_diff for d in divergences.values()), default=0.0)


def compare_arrays(reference: Array, candidate: Array) -> OutputDivergence:
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.shape != cand.shape:
        return MISMATCH
    numeric = _is_numeric(ref) and _is_numeric(cand)
    if not numeric:
        return OutputDivergence(0.0 if np.array_equal(ref, cand) else math.inf, None, 0, 0)
    if ref.size == 0:
        return OutputDivergence(0.0, None, 0, 0)
    a = ref.astype(np.float64)
    b = cand.astype(np.float64)
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    diff[both_nan] = 0.0
    diff[np.isnan(diff)] = math.inf  # NaN on one side only: as far apart as it gets
    max_abs = float(diff.max())
    floating = np.issubdtype(ref.dtype, np.floating) and np.issubdtype(cand.dtype, np.floating)
    if not floating:
        return OutputDivergence(max_abs, None, 0, 0)
    rows_a = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
    rows_b = b.reshape(rows_a.shape)
    cosine = _min_cosine(rows_a, rows_b)
    top1_rows = top1_agreed = 0
    if a.ndim >= 2 and rows_a.shape[1] > 1:
        top1_rows = rows_a.shape[0]
        top1_agreed = int(np.sum(np.argmax(rows_a, axis=1) == np.argmax(rows_b, axis=1)))
    return OutputDivergence(max_abs, cosine, top1_rows, top1_agreed)


def _is_numeric(array: Array) -> bool:
    return bool(np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)


def _min_cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float | None:
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (norm_a * norm_b)
    # Two zero vectors point the same way; one zero vector points nowhere.
    cos = np.where((norm_a == 0) & (norm_b == 0), 1.0, cos)
    cos = np.where((norm_a == 0) ^ (norm_b == 0), 0.0, cos)
    return float(np.clip(cos, -1.0, 1.0).min())
