"""Drift detectors, in Alibi Detect's shape: fitted on reference data once, then
`score(window) -> DriftResult` for each window of sampled rows.

Statistics come from scipy.stats. Each detector controls its false alarms per
window at the configured significance: per-feature p-values are corrected across
the features of one tensor (Bonferroni or Benjamini-Hochberg), and a tensor too
wide for per-feature tests gets one multivariate permutation test instead.
Detectors run on the monitor's background thread, never on the event loop.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.spatial.distance import jensenshannon

from ..config import TensorSpec
from ..tensors import Array
from .params import DriftParams

Floats = npt.NDArray[np.float64]
# A text hook: (token count, unknown-token count) of one string, e.g. from the
# model's own tokenizer and vocabulary.
Tokenizer = Callable[[bytes], tuple[int, int]]

HISTOGRAM_BINS = 20
MAX_CATEGORY_LABELS = 20  # histogram bars shown for a categorical feature
MIN_EXPECTED = 5.0  # chi-squared needs about 5 expected rows per category
MMD_REFERENCE_ROWS = 500  # reference rows in each MMD test: bounds its cost


@dataclass(frozen=True)
class Histogram:
    """Reference and current shares per bin, for the report's plots."""

    labels: tuple[str, ...]  # one per bin
    reference: tuple[float, ...]  # shares, summing to 1
    current: tuple[float, ...]
    edges: tuple[float, ...] = ()  # numeric bins: len(labels) + 1 edges


@dataclass(frozen=True)
class FeatureDrift:
    name: str  # column index, category column, or a text figure ("length")
    p_value: float  # after the correction across the tensor's features
    distance: float
    is_drift: bool
    histogram: Histogram | None = None


@dataclass(frozen=True)
class DriftResult:
    is_drift: bool
    p_value: float  # the tensor's smallest corrected p-value
    distance: float  # the tensor's largest distance
    threshold: float  # p-values below it are drift
    test: str  # numeric | categorical | text | multivariate | classes
    window_size: int  # rows scored (after dropping non-finite ones)
    features: tuple[FeatureDrift, ...] = ()  # empty for multivariate tests
    histogram: Histogram | None = None  # multivariate: distances to the reference mean


class Detector(Protocol):
    test: str
    reference_size: int

    def score(self, window: Array) -> DriftResult: ...


def correct(p_values: Floats, method: str) -> Floats:
    """Adjusted p-values across the features of one tensor."""
    if len(p_values) <= 1:
        return p_values
    if method == "fdr":
        return np.asarray(stats.false_discovery_control(p_values, method="bh"), dtype=np.float64)
    return np.minimum(p_values * len(p_values), 1.0)


def _columns(array: Array) -> Floats:
    return np.asarray(array, dtype=np.float64).reshape(len(array), -1)


def _shares(counts: npt.NDArray[np.int64]) -> tuple[float, ...]:
    total = counts.sum()
    return tuple(float(c) / total if total else 0.0 for c in counts)


def _numeric_histogram(edges: Floats, reference: Floats, current: Floats) -> Histogram:
    inner = (edges[0], edges[-1])
    ref_counts, _ = np.histogram(np.clip(reference, *inner), bins=edges)
    cur_counts, _ = np.histogram(np.clip(current, *inner), bins=edges)
    labels = tuple(f"{(a + b) / 2:.4g}" for a, b in itertools.pairwise(edges))
    return Histogram(
        labels, _shares(ref_counts), _shares(cur_counts), tuple(float(e) for e in edges)
    )


def _edges(column: Floats) -> Floats:
    low, high = np.percentile(column, [0.5, 99.5])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, HISTOGRAM_BINS + 1)


class NumericDetector:
    """Each column: two-sample Kolmogorov-Smirnov p-value, and a distance (Wasserstein
    normed by the reference's standard deviation, or PSI over reference deciles)."""

    test = "numeric"

    def __init__(
        self,
        reference: Array,
        significance: float,
        correction: str = "bonferroni",
        distance: str = "wasserstein",
    ) -> None:
        self._ref = _columns(reference)
        self.reference_size = len(self._ref)
        self._significance = significance
        self._correction = correction
        self._distance = distance
        scale = self._ref.std(axis=0)
        self._scale = np.where(scale > 0, scale, 1.0)
        self._edges = [_edges(col) for col in self._ref.T]
        # PSI bins: reference deciles, so each holds about a tenth of the reference.
        self._deciles = [
            np.unique(np.percentile(col, np.arange(10, 100, 10))) for col in self._ref.T
        ]

    def score(self, window: Array) -> DriftResult:
        win = _columns(window)
        win = win[np.isfinite(win).all(axis=1)]
        if len(win) < 2:
            return _empty(self.test, self._significance, len(win))
        p_raw = np.asarray(
            stats.ks_2samp(self._ref, win, axis=0, method="asymp").pvalue, dtype=np.float64
        ).reshape(-1)
        p_adj = correct(p_raw, self._correction)
        features = []
        for j in range(self._ref.shape[1]):
            distance = self._distance_of(j, win[:, j])
            features.append(
                FeatureDrift(
                    name=str(j),
                    p_value=float(p_adj[j]),
                    distance=distance,
                    is_drift=bool(p_adj[j] < self._significance),
                    histogram=_numeric_histogram(self._edges[j], self._ref[:, j], win[:, j]),
                )
            )
        return _combine(self.test, self._significance, len(win), features)

    def _distance_of(self, j: int, current: Floats) -> float:
        reference = self._ref[:, j]
        if self._distance == "psi":
            return _psi(self._deciles[j], reference, current)
        return float(stats.wasserstein_distance(reference, current) / self._scale[j])


def _psi(cuts: Floats, reference: Floats, current: Floats) -> float:
    bins = len(cuts) + 1
    ref = np.bincount(np.searchsorted(cuts, reference, side="right"), minlength=bins)
    cur = np.bincount(np.searchsorted(cuts, current, side="right"), minlength=bins)
    eps = 1e-4  # an empty bin would make the logarithm infinite
    p = np.maximum(ref / ref.sum(), eps)
    q = np.maximum(cur / cur.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


class CategoricalDetector:
    """Each column: chi-squared test of the 2 x K table (reference vs window counts per
    category) and the Jensen-Shannon distance of the shares. Categories too rare for
    chi-squared at this window size, and values the reference never held, share one
    'other' bin."""

    test = "categorical"

    def __init__(self, reference: Array, significance: float, correction: str = "bonferroni"):
        columns = np.asarray(reference).reshape(len(reference), -1)
        self.reference_size = len(columns)
        self._significance = significance
        self._correction = correction
        self._columns: list[tuple[list[object], npt.NDArray[np.int64]]] = []
        for col in columns.T:
            values, counts = np.unique(col, return_counts=True)
            order = np.argsort(-counts, kind="stable")
            self._columns.append(([values[i] for i in order], counts[order].astype(np.int64)))

    def score(self, window: Array) -> DriftResult:
        columns = np.asarray(window).reshape(len(window), -1)
        if len(columns) < 2:
            return _empty(self.test, self._significance, len(columns))
        p_raw: list[float] = []
        figures: list[tuple[float, Histogram]] = []
        for (values, ref_counts), col in zip(self._columns, columns.T, strict=True):
            p, distance, histogram = self._column(values, ref_counts, col)
            p_raw.append(p)
            figures.append((distance, histogram))
        p_adj = correct(np.asarray(p_raw), self._correction)
        features = [
            FeatureDrift(str(j), float(p_adj[j]), d, bool(p_adj[j] < self._significance), h)
            for j, (d, h) in enumerate(figures)
        ]
        return _combine(self.test, self._significance, len(columns), features)

    def _column(
        self, values: list[object], ref_counts: npt.NDArray[np.int64], col: Array
    ) -> tuple[float, float, Histogram]:
        index = {v: i for i, v in enumerate(values)}
        other = len(values)
        cur_counts = np.bincount(
            np.fromiter((index.get(v, other) for v in col.tolist()), np.int64, len(col)),
            minlength=other + 1,
        )
        ref_full = np.append(ref_counts, 0)
        ref_share = ref_full / ref_full.sum()
        # Lump categories too rare to test at this window size into the 'other' bin.
        keep = ref_share[:other] * len(col) >= MIN_EXPECTED
        ref_table = np.append(ref_full[:other][keep], ref_full[:other][~keep].sum())
        cur_table = np.append(cur_counts[:other][keep], cur_counts[~np.append(keep, False)].sum())
        table = np.vstack([ref_table, cur_table])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] < 2:
            p = 1.0
        else:
            p = float(stats.chi2_contingency(table, correction=False).pvalue)
        distance = float(jensenshannon(ref_full, cur_counts, base=2))
        shown = min(other, MAX_CATEGORY_LABELS)
        labels = (*(_label(v) for v in values[:shown]), "other")
        ref_bins = np.append(ref_full[:shown], ref_full[shown:].sum())
        cur_bins = np.append(cur_counts[:shown], cur_counts[shown:].sum())
        histogram = Histogram(labels, _shares(ref_bins), _shares(cur_bins))
        return p, 0.0 if math.isnan(distance) else distance, histogram


def _label(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class ClassFrequencyDetector:
    """Prediction drift of a classifier: the top-1 class of each row, tested as a
    categorical variable against the reference's top-1 classes."""

    test = "classes"

    def __init__(self, reference: Array, significance: float) -> None:
        self._inner = CategoricalDetector(_top1(reference), significance)
        self.reference_size = self._inner.reference_size

    def score(self, window: Array) -> DriftResult:
        result = self._inner.score(_top1(window))
        features = tuple(
            FeatureDrift("class", f.p_value, f.distance, f.is_drift, f.histogram)
            for f in result.features
        )
        return DriftResult(
            result.is_drift, result.p_value, result.distance, result.threshold, self.test,
            result.window_size, features,
        )  # fmt: skip


def _top1(scores: Array) -> Array:
    flat = np.asarray(scores).reshape(len(scores), -1)
    top: Array = np.argmax(flat, axis=1).reshape(-1, 1)
    return top


class WordTokenizer:
    """The default text hook: lower-cased whitespace words against a known vocabulary."""

    def __init__(self, vocabulary: set[bytes]) -> None:
        self._vocabulary = vocabulary

    def __call__(self, text: bytes) -> tuple[int, int]:
        words = text.lower().split()
        return len(words), sum(1 for w in words if w not in self._vocabulary)


class TextDetector:
    """Strings fed to a tokenizer: the distribution of their length in tokens and of
    their share of unknown tokens, each by Kolmogorov-Smirnov, corrected over the two.

    Without a tokenizer hook the vocabulary is the words of one half of the reference;
    the other half gives the reference figures, so that the reference's own unknown
    share is measured the same way a window's is, not assumed zero."""

    test = "text"

    def __init__(
        self,
        reference: Array,
        significance: float,
        correction: str = "bonferroni",
        tokenizer: Tokenizer | None = None,
    ) -> None:
        texts = _strings(reference)
        if tokenizer is None:
            half = len(texts) // 2
            vocabulary = {w for t in texts[:half] for w in t.lower().split()}
            tokenizer = WordTokenizer(vocabulary)
            texts = texts[half:]
        self._tokenize = tokenizer
        self.reference_size = len(texts)
        self._significance = significance
        self._correction = correction
        self._ref = self._figures(texts)
        self._edges = [_edges(col) for col in self._ref]

    def _figures(self, texts: Sequence[bytes]) -> tuple[Floats, Floats]:
        counts = np.array([self._tokenize(t) for t in texts], dtype=np.float64).reshape(-1, 2)
        lengths = counts[:, 0]
        unknown = np.divide(counts[:, 1], lengths, out=np.zeros_like(lengths), where=lengths > 0)
        return lengths, unknown

    def score(self, window: Array) -> DriftResult:
        texts = _strings(window)
        if len(texts) < 2:
            return _empty(self.test, self._significance, len(texts))
        current = self._figures(texts)
        names = ("length", "unknown_share")
        pairs = zip(self._ref, current, strict=True)
        p_raw = np.array([stats.ks_2samp(r, c, method="asymp").pvalue for r, c in pairs])
        p_adj = correct(p_raw, self._correction)
        features = []
        for j, name in enumerate(names):
            ref, cur = self._ref[j], current[j]
            scale = float(ref.std()) or 1.0
            features.append(
                FeatureDrift(
                    name=name,
                    p_value=float(p_adj[j]),
                    distance=float(stats.wasserstein_distance(ref, cur) / scale),
                    is_drift=bool(p_adj[j] < self._significance),
                    histogram=_numeric_histogram(self._edges[j], ref, cur),
                )
            )
        return _combine(self.test, self._significance, len(texts), features)


def _strings(array: Array) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in np.asarray(array).reshape(-1)]


class MmdDetector:
    """One test for a wide tensor (an image, an embedding): the rows are centred and
    projected to a few dimensions (seeded random projection or PCA of the reference),
    then compared with the reference by maximum mean discrepancy under a Gaussian kernel
    (median-heuristic bandwidth), its p-value from a permutation test."""

    test = "multivariate"

    def __init__(
        self,
        reference: Array,
        significance: float,
        projection: str = "random",
        dim: int = 32,
        permutations: int = 200,
        seed: int = 0,
    ) -> None:
        ref = _columns(reference)
        self.reference_size = len(ref)
        self._significance = significance
        self._permutations = permutations
        self._rng = np.random.default_rng(seed)
        self._mean = ref.mean(axis=0)
        width = ref.shape[1]
        k = min(dim, width)
        order = self._rng.permutation(len(ref))
        if k == width:
            self._projection = np.eye(width)
            keep = order[:MMD_REFERENCE_ROWS]
        elif projection == "pca":
            # Fit the components on rows the test will not compare with: projected onto
            # their own top components, rows look wider than fresh rows do, and every
            # window would then seem to drift.
            keep = order[: min(MMD_REFERENCE_ROWS, len(ref) // 2)]
            fit = ref[order[len(keep) :]]
            _, _, vt = np.linalg.svd(fit - fit.mean(axis=0), full_matrices=False)
            self._projection = vt[:k].T
        else:
            self._projection = self._rng.standard_normal((width, k)) / math.sqrt(k)
            keep = order[:MMD_REFERENCE_ROWS]
        self._ref = self._project(ref[keep])
        sq = _sq_distances(self._ref, self._ref)
        median = float(np.median(sq[np.triu_indices(len(self._ref), 1)]))
        self._gamma = 1.0 / (median if median > 0 else 1.0)
        self._ref_norms = np.sqrt((self._ref**2).sum(axis=1))
        self._edges = _edges(self._ref_norms)

    def _project(self, rows: Floats) -> Floats:
        return np.asarray((rows - self._mean) @ self._projection, dtype=np.float64)

    def score(self, window: Array) -> DriftResult:
        win = _columns(window)
        win = win[np.isfinite(win).all(axis=1)]
        if len(win) < 2:
            return _empty(self.test, self._significance, len(win))
        x = self._project(win)
        pooled = np.vstack([self._ref, x])
        kernel = np.exp(-self._gamma * _sq_distances(pooled, pooled))
        np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out i == j
        n, m = len(self._ref), len(x)
        observed = np.zeros((1, n + m))
        observed[0, :n] = 1.0
        shuffled = np.zeros((self._permutations, n + m))
        for i in range(self._permutations):
            shuffled[i, self._rng.permutation(n + m)[:n]] = 1.0
        stat = _mmd2(kernel, observed, n, m)[0]
        null = _mmd2(kernel, shuffled, n, m)
        p = float((1 + np.sum(null >= stat)) / (1 + self._permutations))
        norms = np.sqrt((x**2).sum(axis=1))
        histogram = _numeric_histogram(self._edges, self._ref_norms, norms)
        return DriftResult(
            is_drift=p < self._significance,
            p_value=p,
            distance=max(float(stat), 0.0),
            threshold=self._significance,
            test=self.test,
            window_size=m,
            histogram=histogram,
        )


def _sq_distances(a: Floats, b: Floats) -> Floats:
    sq = (a**2).sum(axis=1)[:, None] + (b**2).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.asarray(np.maximum(sq, 0.0), dtype=np.float64)


def _mmd2(kernel: Floats, first: Floats, n: int, m: int) -> Floats:
    """Unbiased MMD^2 for each row of `first` (1 marks the reference side), all at
    once: three quadratic forms through one matrix product."""
    second = 1.0 - first
    k_first = first @ kernel
    within_a = (k_first * first).sum(axis=1)
    cross = (k_first * second).sum(axis=1)
    within_b = ((second @ kernel) * second).sum(axis=1)
    return np.asarray(
        within_a / (n * (n - 1)) + within_b / (m * (m - 1)) - 2.0 * cross / (n * m),
        dtype=np.float64,
    )


def _combine(
    test: str, significance: float, size: int, features: list[FeatureDrift]
) -> DriftResult:
    return DriftResult(
        is_drift=any(f.is_drift for f in features),
        p_value=min(f.p_value for f in features),
        distance=max(f.distance for f in features),
        threshold=significance,
        test=test,
        window_size=size,
        features=tuple(features),
    )


def _empty(test: str, significance: float, size: int) -> DriftResult:
    # Too few usable rows is "no evidence", not drift.
    return DriftResult(False, 1.0, 0.0, significance, test, size)


def choose_test(
    tensor: TensorSpec,
    reference: Array,
    params: DriftParams,
    classifier: bool = False,
) -> str:
    """The test for a tensor: the `drift_test` override, else by dtype and shape.
    `classifier`: an output known to hold class scores (label file or softmax)."""
    override = params.tests.get(tensor.name)
    if override is not None:
        return override
    if tensor.datatype == "BYTES":
        distinct = len(set(np.asarray(reference).reshape(-1).tolist()))
        return "categorical" if distinct <= params.categorical_max_values else "text"
    if any(d < 0 for d in tensor.dims):
        return "off"  # rows of varying shape have no fixed columns to compare
    width = math.prod(tensor.dims)
    if classifier and width > 1:
        return "classes"
    if tensor.datatype == "BOOL":
        return "categorical" if width <= params.max_features else "multivariate"
    columns = np.asarray(reference).reshape(len(reference), -1)
    if width <= params.max_features and columns.dtype.kind in "iu":
        few = all(len(np.unique(col)) <= params.categorical_max_values for col in columns.T)
        if few:
            return "categorical"
    return "numeric" if width <= params.max_features else "multivariate"


def build_detector(
    test: str,
    reference: Array,
    params: DriftParams,
    tokenizer: Tokenizer | None = None,
) -> Detector:
    """A detector of the given kind, fitted on the reference rows."""
    alpha = params.significance
    if test == "numeric":
        return NumericDetector(reference, alpha, params.correction, params.distance)
    if test == "categorical":
        return CategoricalDetector(reference, alpha, params.correction)
    if test == "classes":
        return ClassFrequencyDetector(reference, alpha)
    if test == "text":
        return TextDetector(reference, alpha, params.correction, tokenizer)
    if test == "multivariate":
        return MmdDetector(
            reference, alpha, params.projection, params.projection_dim, params.permutations,
            params.seed,
        )  # fmt: skip
    raise ValueError(f"no detector for test '{test}'")
