"""Output divergence: max abs diff, cosine similarity, top-1 agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convoy.rollouts.compare import compare_arrays, compare_outputs, divergence_score


def test_scaled_output_shows_in_max_abs_diff_not_in_cosine() -> None:
    x = np.array([[1.0, -2.0, 4.0], [0.5, 0.25, 3.0]], dtype=np.float32)
    d = compare_arrays(2 * x, 3 * x)
    assert d.max_abs_diff == pytest.approx(4.0)
    assert d.cosine == pytest.approx(1.0)


def test_identical_outputs_do_not_diverge() -> None:
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    d = compare_arrays(x, x.copy())
    assert d.max_abs_diff == 0.0
    assert d.cosine == pytest.approx(1.0)
    assert d.top1_agreement == 1.0


def test_top1_agreement_counts_rows_whose_argmax_agrees() -> None:
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    cand = ref.copy()
    cand[1] = [0.2, 0.8]  # one decision flipped
    d = compare_arrays(ref, cand)
    assert (d.top1_rows, d.top1_agreed) == (4, 3)
    assert d.top1_agreement == 0.75


def test_cosine_is_the_worst_row_and_handles_zero_vectors() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=np.float64)
    cand = np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=np.float64)
    d = compare_arrays(ref, cand)
    assert d.cosine == pytest.approx(0.0)
    both_zero = compare_arrays(np.zeros((1, 3)), np.zeros((1, 3)))
    assert both_zero.cosine == 1.0


def test_shape_or_missing_output_is_an_infinite_divergence() -> None:
    a = np.zeros((2, 3), dtype=np.float32)
    assert math.isinf(compare_arrays(a, np.zeros((3, 2), dtype=np.float32)).max_abs_diff)
    result = compare_outputs({"y": a, "z": a}, {"y": a})
    assert result["y"].max_abs_diff == 0.0
    assert math.isinf(result["z"].max_abs_diff)
    assert math.isinf(divergence_score(result))


def test_nan_on_one_side_diverges_nan_on_both_does_not() -> None:
    a = np.array([1.0, np.nan], dtype=np.float32)
    assert compare_arrays(a, a.copy()).max_abs_diff == 0.0
    assert math.isinf(compare_arrays(a, np.array([1.0, 2.0], np.float32)).max_abs_diff)


def test_integer_and_bytes_outputs() -> None:
    ids = compare_arrays(np.array([[3], [1]], np.int64), np.array([[3], [4]], np.int64))
    assert ids.max_abs_diff == 3.0 and ids.cosine is None and ids.top1_rows == 0
    text = np.array([b"a", b"b"], dtype=object)
    assert compare_arrays(text, text.copy()).max_abs_diff == 0.0
    assert math.isinf(compare_arrays(text, np.array([b"a", b"c"], dtype=object)).max_abs_diff)


def test_score_is_the_worst_output() -> None:
    x = np.ones((2, 2), np.float32)
    result = compare_outputs({"a": x, "b": x}, {"a": x + 0.5, "b": x + 0.01})
    assert divergence_score(result) == pytest.approx(0.5)
    assert divergence_score({}) == 0.0
