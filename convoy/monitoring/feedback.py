"""Accuracy from feedback: recent predictions kept by request id, judged when the
true label (or value) arrives later through the MonitoringService Feedback RPC.

The record is bounded twice: by age (`feedback_ttl_s`) and by count
(`feedback_max_entries`, the oldest evicted first), so memory stays flat however
few callers send feedback. A prediction is judged once and then forgotten.
Feedback that cannot be used (unknown or expired id, a label of the wrong type, an
oversized payload) is counted by reason and refused with a clear error; it changes
nothing. Rolling accuracy (classification, top-1) or mean absolute error
(regression) is kept per model version over the last `feedback_window` judgements.

record() and feedback() run on the event loop; figures() may run on the metrics
scrape thread, hence the lock around what both touch.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInput, ModelNotFound
from ..tensors import Array
from .params import FeedbackParams

MAX_ID_BYTES = 256  # a KServe request id longer than this is never recorded
MAX_LABEL_BYTES = 1024  # a class label longer than this is refused
REFUSAL_REASONS = (
    "unknown_model", "unknown_id", "expired", "wrong_version", "wrong_type", "too_large",
    "invalid_value",
)  # fmt: skip

FeedbackLabel = int | float | str  # class index | regression value | class label
Clock = Callable[[], float]  # seconds, monotonic


class PredictionNotFound(ModelNotFound):
    """No prediction is kept under that request id: never recorded, expired, or
    already judged. A ModelNotFound, so it answers NOT_FOUND."""


class FeedbackRefused(InvalidInput):
    """Feedback that cannot be judged: the wrong label type, too large, not finite."""


@dataclass(frozen=True)
class Prediction:
    version: str
    value: int | float | str  # top-1 class index or label, or the regression value
    recorded_s: float


@dataclass(frozen=True)
class FeedbackOutcome:
    version: str
    correct: bool | None  # classification
    error: float | None  # regression: absolute error
    rolling: float  # the version's rolling accuracy or mean absolute error
    window: int  # judgements it is computed over


@dataclass(frozen=True)
class VersionFeedback:
    version: str
    task: str
    window: int  # judgements in the rolling window
    rolling: float | None  # accuracy or MAE; None before the first judgement
    reference: float | None  # feedback_reference_accuracy / _error
    accepted: int  # judgements ever made


class _Rolling:
    def __init__(self, size: int) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._sum = 0.0
        self.accepted = 0

    def add(self, value: float) -> None:
        if len(self._values) == self._values.maxlen:
            self._sum -= self._values[0]
        self._values.append(value)
        self._sum += value
        self.accepted += 1

    def resized(self, size: int) -> _Rolling:
        """The same judgements over a window of `size`: the latest ones stay."""
        rolling = _Rolling(size)
        for value in list(self._values)[-size:]:
            rolling.add(value)
        rolling.accepted = self.accepted
        return rolling

    @property
    def count(self) -> int:
        return len(self._values)

    @property
    def mean(self) -> float | None:
        return self._sum / len(self._values) if self._values else None


class FeedbackStore:
    """Recent predictions of one model (all its versions) and their judgements."""

    def __init__(
        self,
        model: str,
        params: FeedbackParams,
        batched: bool,
        labels: Sequence[str] = (),
        clock: Clock = time.monotonic,
    ) -> None:
        """`labels`: the feedback output's class labels (its label_filename), if any,
        so that feedback may name a class instead of its index."""
        self.model = model
        self.params = params
        self._batched = batched
        self._labels = list(labels)
        self._label_index = {label: i for i, label in enumerate(self._labels)}
        self._clock = clock
        self._predictions: collections.OrderedDict[str, Prediction] = collections.OrderedDict()
        self._rolling: dict[str, _Rolling] = {}
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._lock = threading.Lock()

    def reconfigure(self, settings: FeedbackStore) -> None:
        """Take the settings of another store of the same model (a reload's feedback_*
        parameters). What still means the same is kept: predictions awaiting feedback
        (the oldest evicted past the new max_entries) and each version's rolling
        figures (the latest judgements, up to the new window), unless the output, the
        task, the class labels or batching changed, which makes them figures of another
        question; refusal counts always stay. On the event loop, like record()."""
        if settings is self:
            return
        with self._lock:
            same_question = (
                settings.params.output == self.params.output
                and settings.params.task == self.params.task
                and settings._labels == self._labels
                and settings._batched == self._batched
            )
            self.params = settings.params
            self._batched = settings._batched
            self._labels = list(settings._labels)
            self._label_index = dict(settings._label_index)
            if same_question:
                self._rolling = {v: r.resized(self.params.window) for v, r in self._rolling.items()}
            else:
                self._rolling = {}
                self._predictions.clear()
        predictions = self._predictions
        while len(predictions) > self.params.max_entries:
            predictions.popitem(last=False)

    # -- the event loop, per answered request -----------------------------------------

    def record(self, request_id: str, version: str, outputs: Mapping[str, Array]) -> bool:
        """Keep the prediction of an answered request (its first row); False when it
        cannot be referred to later (no id, an oversized id, the output not returned)."""
        array = outputs.get(self.params.output)
        if not request_id or len(request_id) > MAX_ID_BYTES or array is None or array.size == 0:
            return False
        row = np.asarray(array[0] if self._batched else array).reshape(-1)
        value = self._prediction(row)
        now = self._clock()
        predictions = self._predictions
        predictions.pop(request_id, None)  # a reused id refers to its latest request
        expiry = now - self.params.ttl_s
        while predictions and (
            len(predictions) >= self.params.max_entries
            or next(iter(predictions.values())).recorded_s < expiry
        ):
            predictions.popitem(last=False)  # oldest first: insertion order is time order
        predictions[request_id] = Prediction(version, value, now)
        return True

    def _prediction(self, row: Array) -> int | float | str:
        if self.params.task == "regression":
            return float(row[0])
        if row.dtype == np.object_:
            first = row[0]
            return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
        if row.size == 1 and row.dtype.kind in "iub":
            return int(row[0])
        return int(np.argmax(row))

    # -- the Feedback RPC -----------------------------------------------------------

    def feedback(self, request_id: str, label: FeedbackLabel, version: str = "") -> FeedbackOutcome:
        """Judge the prediction kept under request_id; PredictionNotFound or
        FeedbackRefused (counted, nothing changed) when it cannot be judged."""
        truth = self._check(request_id, label)
        prediction = self._predictions.get(request_id)
        if prediction is None:
            raise self._refuse("unknown_id", PredictionNotFound(
                f"model '{self.model}' keeps no prediction for request id '{request_id[:64]}' "
                "(never recorded, already judged, or evicted)"
            ))  # fmt: skip
        if prediction.recorded_s < self._clock() - self.params.ttl_s:
            del self._predictions[request_id]
            raise self._refuse("expired", PredictionNotFound(
                f"the prediction for request id '{request_id[:64]}' is older than "
                f"feedback_ttl_s ({self.params.ttl_s:g} s)"
            ))  # fmt: skip
        if version and version != prediction.version:
            raise self._refuse("wrong_version", FeedbackRefused(
                f"request id '{request_id[:64]}' was answered by version "
                f"{prediction.version}, not {version}"
            ))  # fmt: skip
        del self._predictions[request_id]
        with self._lock:
            rolling = self._rolling.get(prediction.version)
            if rolling is None:
                rolling = self._rolling[prediction.version] = _Rolling(self.params.window)
            if self.params.task == "regression":
                assert not isinstance(truth, str) and not isinstance(prediction.value, str)
                error = abs(float(prediction.value) - float(truth))
                rolling.add(error)
                correct = None
            else:
                correct = _same_class(prediction.value, truth, self._labels)
                rolling.add(1.0 if correct else 0.0)
                error = None
            mean = rolling.mean
            count = rolling.count
        assert mean is not None
        return FeedbackOutcome(prediction.version, correct, error, mean, count)

    def _check(self, request_id: str, label: FeedbackLabel) -> int | float | str:
        """The label as a class index, a value or label text, or a counted refusal."""
        if not request_id:
            raise self._refuse("unknown_id", FeedbackRefused("feedback needs the request id"))
        if len(request_id) > MAX_ID_BYTES:
            raise self._refuse("too_large", FeedbackRefused(
                f"request id of {len(request_id)} characters; ids over {MAX_ID_BYTES} are "
                "never recorded"
            ))  # fmt: skip
        task = self.params.task
        if task == "regression":
            if not isinstance(label, float):
                raise self._refuse("wrong_type", FeedbackRefused(
                    f"model '{self.model}' is judged by regression: send the true value "
                    f"(value), not a {_kind(label)}"
                ))  # fmt: skip
            if not math.isfinite(label):
                raise self._refuse("invalid_value", FeedbackRefused("the value is not finite"))
            return label
        if isinstance(label, float):
            raise self._refuse("wrong_type", FeedbackRefused(
                f"model '{self.model}' is judged by classification: send the true class "
                "(class_index or class_label), not a value"
            ))  # fmt: skip
        if isinstance(label, str):
            if len(label.encode("utf-8", "replace")) > MAX_LABEL_BYTES:
                raise self._refuse("too_large", FeedbackRefused(
                    f"class_label over {MAX_LABEL_BYTES} bytes"
                ))  # fmt: skip
            if self._labels:
                index = self._label_index.get(label)
                if index is None:
                    raise self._refuse("invalid_value", FeedbackRefused(
                        f"'{label[:64]}' is not one of the output's class labels"
                    ))  # fmt: skip
                return index
            return label
        if label < 0:
            raise self._refuse("invalid_value", FeedbackRefused("class_index must be >= 0"))
        return label

    def _refuse(self, reason: str, error: Exception) -> Exception:
        with self._lock:
            self._refused[reason] += 1
        return error

    # -- figures, for the exporter and DriftStatus -------------------------------------------

    def figures(self) -> list[VersionFeedback]:
        reference = (
            self.params.reference_accuracy
            if self.params.task == "classification"
            else self.params.reference_error
        )
        with self._lock:
            return [
                VersionFeedback(v, self.params.task, r.count, r.mean, reference, r.accepted)
                for v, r in sorted(self._rolling.items())
            ]

    def refusals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused)

    @property
    def kept(self) -> int:
        return len(self._predictions)


def _same_class(
    predicted: int | float | str, truth: int | float | str, labels: Sequence[str]
) -> bool:
    if isinstance(truth, str):
        # No label file: a class label is compared with the predicted class as text.
        return str(predicted) == truth
    if isinstance(predicted, str):
        # A BYTES output names its class; the truth came as an index into the labels.
        return 0 <= int(truth) < len(labels) and labels[int(truth)] == predicted
    return int(predicted) == int(truth)


def _kind(label: FeedbackLabel) -> str:
    return "class label" if isinstance(label, str) else "class index"
