"""The monitoring parameters of a model's config.pbtxt, parsed and validated at load time.

Drift monitoring is on when `drift_reference` is set; feedback (accuracy from true
labels) is on when any `feedback_*` key is set. Every other key has the default
documented beside it (and in docs/monitoring.md). An unknown `drift_*` or
`feedback_*` key is refused, so that a typo fails the load instead of silently
leaving a default in place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..config import ModelSpec, TensorSpec
from ..errors import ConfigError

DRIFT_REFERENCE = "drift_reference"
DRIFT_WINDOW = "drift_window"
DRIFT_SAMPLE_RATE = "drift_sample_rate"
DRIFT_ROWS_PER_REQUEST = "drift_rows_per_request"
DRIFT_INTERVAL = "drift_interval_s"
DRIFT_SIGNIFICANCE = "drift_significance"
DRIFT_CORRECTION = "drift_correction"
DRIFT_DISTANCE = "drift_distance"
DRIFT_TEST = "drift_test"
DRIFT_CATEGORICAL_MAX = "drift_categorical_max_values"
DRIFT_MAX_FEATURES = "drift_max_features"
DRIFT_PROJECTION = "drift_projection"
DRIFT_PROJECTION_DIM = "drift_projection_dim"
DRIFT_PERMUTATIONS = "drift_permutations"
DRIFT_SEED = "drift_seed"
FEEDBACK_OUTPUT = "feedback_output"
FEEDBACK_TASK = "feedback_task"
FEEDBACK_REFERENCE_ACCURACY = "feedback_reference_accuracy"
FEEDBACK_REFERENCE_ERROR = "feedback_reference_error"
FEEDBACK_WINDOW = "feedback_window"
FEEDBACK_TTL = "feedback_ttl_s"
FEEDBACK_MAX_ENTRIES = "feedback_max_entries"

DRIFT_KEYS = frozenset(
    {
        DRIFT_REFERENCE, DRIFT_WINDOW, DRIFT_SAMPLE_RATE, DRIFT_ROWS_PER_REQUEST, DRIFT_INTERVAL,
        DRIFT_SIGNIFICANCE, DRIFT_CORRECTION, DRIFT_DISTANCE, DRIFT_TEST, DRIFT_CATEGORICAL_MAX,
        DRIFT_MAX_FEATURES, DRIFT_PROJECTION, DRIFT_PROJECTION_DIM, DRIFT_PERMUTATIONS, DRIFT_SEED,
    }
)  # fmt: skip
FEEDBACK_KEYS = frozenset(
    {
        FEEDBACK_OUTPUT, FEEDBACK_TASK, FEEDBACK_REFERENCE_ACCURACY, FEEDBACK_REFERENCE_ERROR,
        FEEDBACK_WINDOW, FEEDBACK_TTL, FEEDBACK_MAX_ENTRIES,
    }
)  # fmt: skip

# Test kinds a tensor can be given in `drift_test`; "auto" picks by dtype and shape.
TEST_KINDS = ("numeric", "categorical", "text", "multivariate", "classes", "off")
CORRECTIONS = ("bonferroni", "fdr")
DISTANCES = ("wasserstein", "psi")
PROJECTIONS = ("random", "pca")
TASKS = ("classification", "regression")
_FIRST_N = re.compile(r"^first:(\d+)$")


@dataclass(frozen=True)
class DriftParams:
    """Drift monitoring of one model; the defaults are the documented ones."""

    reference_file: str = ""  # a .npz in the model directory; "" with first_n > 0
    first_n: int = 0  # "first:N": the first N sampled rows become the reference
    window: int = 200  # sampled rows (strings for BYTES) per test window
    sample_rate: float = 1.0  # share of requests sampled, in (0, 1]
    rows_per_request: int = 4  # rows copied from one sampled request, at most
    interval_s: float = 10.0  # how often the background thread tests full windows
    significance: float = 0.05  # false-alarm rate per window, after correction
    correction: str = "bonferroni"  # across the features of one input: bonferroni | fdr
    distance: str = "wasserstein"  # numeric distance: wasserstein (normed) | psi
    tests: dict[str, str] = field(default_factory=dict)  # tensor -> kind; absent: auto
    categorical_max_values: int = 20  # integer/BYTES with at most this many values: categorical
    max_features: int = 32  # numeric tensors wider than this get one multivariate test
    projection: str = "random"  # before MMD: random | pca
    projection_dim: int = 32
    permutations: int = 200  # MMD permutation test
    seed: int = 0  # projections and permutations are seeded: reruns give the same figures

    @property
    def source(self) -> str:
        return self.reference_file or f"first:{self.first_n}"


@dataclass(frozen=True)
class FeedbackParams:
    """Accuracy from feedback: how predictions are kept and judged."""

    output: str  # the output whose first row is the prediction
    task: str  # classification (top-1 class) | regression (first value)
    reference_accuracy: float | None = None  # classification: accuracy at validation
    reference_error: float | None = None  # regression: mean absolute error at validation
    window: int = 1000  # rolling over this many latest feedbacks per version
    ttl_s: float = 3600.0  # predictions older than this cannot receive feedback
    max_entries: int = 100_000  # predictions kept at most (the oldest go first)


@dataclass(frozen=True)
class MonitoringParams:
    drift: DriftParams | None
    feedback: FeedbackParams | None


def parse_monitoring_params(spec: ModelSpec, path: str) -> MonitoringParams:
    """Validate the monitoring keys of spec.parameters; ConfigError names the key."""
    params = spec.parameters
    for key in sorted(params):
        if key.startswith(("drift_", "feedback_")) and key not in DRIFT_KEYS | FEEDBACK_KEYS:
            raise ConfigError(path, f"parameters.{key}", "is not a monitoring parameter")
    drift = _drift(spec, params, path) if DRIFT_REFERENCE in params else None
    if drift is None:
        stray = sorted(k for k in params if k in DRIFT_KEYS)
        if stray:
            raise ConfigError(path, f"parameters.{stray[0]}", f"needs parameters.{DRIFT_REFERENCE}")
    feedback = _feedback(spec, params, path) if FEEDBACK_KEYS & params.keys() else None
    return MonitoringParams(drift, feedback)


def _drift(spec: ModelSpec, params: dict[str, str], path: str) -> DriftParams:
    reference = params[DRIFT_REFERENCE].strip()
    first = _FIRST_N.match(reference)
    field_ = f"parameters.{DRIFT_REFERENCE}"
    if first is not None:
        first_n = int(first.group(1))
        if first_n < 20:
            raise ConfigError(
                path, field_, f"first:{first_n} is too few rows; use first:20 or more"
            )
        reference_file = ""
    else:
        first_n = 0
        reference_file = reference
        if not reference.endswith(".npz") or "/" in reference or reference.startswith("."):
            raise ConfigError(
                path, field_, f"'{reference}' must name a .npz file in the model directory "
                "(no path) or be first:N",
            )  # fmt: skip
    window = _int(params, DRIFT_WINDOW, 200, path, low=20)
    significance = _float(params, DRIFT_SIGNIFICANCE, 0.05, path)
    if not 0 < significance < 1:
        raise ConfigError(path, f"parameters.{DRIFT_SIGNIFICANCE}", "must lie in (0, 1)")
    rate = _float(params, DRIFT_SAMPLE_RATE, 1.0, path)
    if not 0 < rate <= 1:
        raise ConfigError(path, f"parameters.{DRIFT_SAMPLE_RATE}", "must lie in (0, 1]")
    interval = _float(params, DRIFT_INTERVAL, 10.0, path)
    if not interval > 0:
        raise ConfigError(path, f"parameters.{DRIFT_INTERVAL}", "must be > 0")
    return DriftParams(
        reference_file=reference_file,
        first_n=first_n,
        window=window,
        sample_rate=rate,
        rows_per_request=_int(params, DRIFT_ROWS_PER_REQUEST, 4, path, low=1),
        interval_s=interval,
        significance=significance,
        correction=_choice(params, DRIFT_CORRECTION, CORRECTIONS, path),
        distance=_choice(params, DRIFT_DISTANCE, DISTANCES, path),
        tests=_tests(spec, params.get(DRIFT_TEST, ""), path),
        categorical_max_values=_int(params, DRIFT_CATEGORICAL_MAX, 20, path, low=2),
        max_features=_int(params, DRIFT_MAX_FEATURES, 32, path, low=1),
        projection=_choice(params, DRIFT_PROJECTION, PROJECTIONS, path),
        projection_dim=_int(params, DRIFT_PROJECTION_DIM, 32, path, low=1),
        # Fewer than 19 permutations cannot reach p < 0.05.
        permutations=_int(params, DRIFT_PERMUTATIONS, 200, path, low=19),
        seed=_int(params, DRIFT_SEED, 0, path, low=0),
    )


def _tests(spec: ModelSpec, text: str, path: str) -> dict[str, str]:
    """`drift_test`: "NAME:KIND[,NAME:KIND...]" for inputs and outputs."""
    field_ = f"parameters.{DRIFT_TEST}"
    names = {t.name for t in (*spec.inputs, *spec.outputs)}
    tests: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, kind = item.rpartition(":")
        if not sep or not name:
            raise ConfigError(path, field_, f"'{item}' is not NAME:KIND")
        if name not in names:
            raise ConfigError(path, field_, f"'{name}' is not an input or output of the model")
        if kind not in TEST_KINDS:
            raise ConfigError(path, field_, f"'{kind}' is not one of {list(TEST_KINDS)}")
        tests[name] = kind
    return tests


def _feedback(spec: ModelSpec, params: dict[str, str], path: str) -> FeedbackParams:
    output_name = params.get(FEEDBACK_OUTPUT, spec.outputs[0].name)
    output = spec.output(output_name)
    if output is None:
        raise ConfigError(
            path, f"parameters.{FEEDBACK_OUTPUT}", f"'{output_name}' is not an output of the model"
        )
    task = params.get(FEEDBACK_TASK) or default_task(output)
    if task not in TASKS:
        raise ConfigError(path, f"parameters.{FEEDBACK_TASK}", f"'{task}' is not one of {TASKS}")
    if task == "regression" and output.datatype in ("BYTES", "BOOL"):
        raise ConfigError(
            path, f"parameters.{FEEDBACK_TASK}", f"output '{output_name}' holds no numbers"
        )
    accuracy = _optional_float(params, FEEDBACK_REFERENCE_ACCURACY, path)
    error = _optional_float(params, FEEDBACK_REFERENCE_ERROR, path)
    if accuracy is not None and (task != "classification" or not 0 < accuracy <= 1):
        raise ConfigError(
            path, f"parameters.{FEEDBACK_REFERENCE_ACCURACY}",
            "needs a classification output and a value in (0, 1]",
        )  # fmt: skip
    if error is not None and (task != "regression" or error < 0):
        raise ConfigError(
            path, f"parameters.{FEEDBACK_REFERENCE_ERROR}",
            "needs a regression output and a value >= 0",
        )  # fmt: skip
    ttl = _float(params, FEEDBACK_TTL, 3600.0, path)
    if not ttl > 0:
        raise ConfigError(path, f"parameters.{FEEDBACK_TTL}", "must be > 0")
    return FeedbackParams(
        output=output_name,
        task=task,
        reference_accuracy=accuracy,
        reference_error=error,
        window=_int(params, FEEDBACK_WINDOW, 1000, path, low=1),
        ttl_s=ttl,
        max_entries=_int(params, FEEDBACK_MAX_ENTRIES, 100_000, path, low=1),
    )


def default_task(output: TensorSpec) -> str:
    """Scores per class (several values a row), integers or labels: classification;
    one floating-point value a row: regression."""
    if output.datatype.startswith("FP"):
        width = math.prod(output.dims) if all(d > 0 for d in output.dims) else 2
        return "classification" if width > 1 else "regression"
    return "classification"


def _int(params: dict[str, str], key: str, default: int, path: str, low: int) -> int:
    text = params.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(path, f"parameters.{key}", f"'{text}' is not an integer") from None
    if value < low:
        raise ConfigError(path, f"parameters.{key}", f"must be >= {low}, got {value}")
    return value


def _float(params: dict[str, str], key: str, default: float, path: str) -> float:
    value = _optional_float(params, key, path)
    return default if value is None else value


def _optional_float(params: dict[str, str], key: str, path: str) -> float | None:
    text = params.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(path, f"parameters.{key}", f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(path, f"parameters.{key}", f"'{text}' is not a finite number")
    return value


def _choice(params: dict[str, str], key: str, choices: tuple[str, ...], path: str) -> str:
    value = params.get(key, choices[0])
    if value not in choices:
        raise ConfigError(path, f"parameters.{key}", f"'{value}' is not one of {list(choices)}")
    return value
