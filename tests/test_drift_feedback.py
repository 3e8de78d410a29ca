"""Accuracy from feedback: rolling figures per version, bounded record, refusals that
are counted and change nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from convoy.errors import InvalidInput, ModelNotFound
from convoy.monitoring.exporter import MonitoringCollector
from convoy.monitoring.feedback import FeedbackStore, PredictionNotFound
from convoy.monitoring.params import FeedbackParams
from convoy.monitoring.registry import ModelMonitoring, Monitors


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _classifier(clock: FakeClock, **overrides: object) -> FeedbackStore:
    params = FeedbackParams(
        output="SCORES", task="classification", reference_accuracy=0.9, window=100, ttl_s=60.0
    )
    params = dataclasses.replace(params, **overrides)  # type: ignore[arg-type]
    return FeedbackStore("m", params, batched=True, labels=["a", "b", "c", "d"], clock=clock)


def _scores(top: int) -> dict[str, np.ndarray]:
    row = np.zeros((1, 4), np.float32)
    row[0, top] = 1.0
    return {"SCORES": row}


def test_accuracy_falls_when_labels_stop_matching() -> None:
    clock = FakeClock()
    store = _classifier(clock)
    rng = np.random.default_rng(0)
    for i in range(100):
        top = int(rng.integers(0, 4))
        assert store.record(f"r{i}", "1", _scores(top))
        outcome = store.feedback(f"r{i}", top)  # labels agree with predictions
    assert outcome.correct and outcome.rolling == 1.0 and outcome.window == 100
    for i in range(100, 160):
        top = int(rng.integers(0, 4))
        store.record(f"r{i}", "1", _scores(top))
        store.feedback(f"r{i}", (top + 1) % 4)  # the world changed: predictions are wrong
    [figures] = store.figures()
    assert figures.window == 100  # rolling over the last 100 judgements
    assert figures.rolling == pytest.approx(0.4)
    assert figures.reference == 0.9
    assert figures.accepted == 160


def test_labels_by_name_and_versions_kept_apart() -> None:
    clock = FakeClock()
    store = _classifier(clock)
    store.record("x", "1", _scores(2))
    store.record("y", "2", _scores(2))
    assert store.feedback("x", "c").correct is True
    assert store.feedback("y", "a", version="2").correct is False
    assert {f.version: f.rolling for f in store.figures()} == {"1": 1.0, "2": 0.0}


def test_regression_error() -> None:
    params = FeedbackParams(output="Y", task="regression", reference_error=0.5)
    store = FeedbackStore("r", params, batched=True, clock=FakeClock())
    store.record("a", "1", {"Y": np.array([[2.0]], np.float32)})
    store.record("b", "1", {"Y": np.array([[1.0]], np.float32)})
    assert store.feedback("a", 3.0).error == pytest.approx(1.0)
    outcome = store.feedback("b", 1.5)
    assert outcome.rolling == pytest.approx(0.75)


def test_bad_feedback_is_refused_counted_and_changes_nothing() -> None:
    clock = FakeClock()
    store = _classifier(clock)
    store.record("kept", "1", _scores(1))
    bad: list[tuple[str, object, str, type[Exception]]] = [
        ("unknown", 1, "unknown_id", PredictionNotFound),
        ("kept", 0.5, "wrong_type", InvalidInput),
        ("kept", "x" * 5000, "too_large", InvalidInput),
        ("k" * 300, 1, "too_large", InvalidInput),
        ("kept", "no such class", "invalid_value", InvalidInput),
        ("kept", -3, "invalid_value", InvalidInput),
    ]
    for request_id, label, reason, error in bad:
        before = store.refusals()[reason]
        with pytest.raises(error):
            store.feedback(request_id, label)  # type: ignore[arg-type]
        assert store.refusals()[reason] == before + 1, reason
    with pytest.raises(InvalidInput, match="answered by version 1"):
        store.feedback("kept", 1, version="7")
    assert store.figures() == []  # nothing judged
    assert store.kept == 1  # and the prediction is still there to be judged
    assert store.feedback("kept", 1).correct is True
    with pytest.raises(PredictionNotFound):
        store.feedback("kept", 1)  # judged once, then forgotten
    assert issubclass(PredictionNotFound, ModelNotFound)  # answers NOT_FOUND


def test_expired_predictions_are_refused_and_evicted() -> None:
    clock = FakeClock()
    store = _classifier(clock)
    store.record("old", "1", _scores(0))
    clock.now = 61.0
    with pytest.raises(PredictionNotFound, match="older than feedback_ttl_s"):
        store.feedback("old", 0)
    assert store.refusals()["expired"] == 1
    store.record("a", "1", _scores(0))
    clock.now = 200.0
    store.record("b", "1", _scores(0))  # recording evicts what has expired
    assert store.kept == 1


def test_record_is_bounded_by_max_entries() -> None:
    store = _classifier(FakeClock(), max_entries=10)
    for i in range(1000):
        store.record(f"r{i}", "1", _scores(0))
    assert store.kept == 10
    with pytest.raises(PredictionNotFound):
        store.feedback("r0", 0)
    assert store.feedback("r999", 0).correct is True


def test_unrecordable_requests_are_skipped() -> None:
    store = _classifier(FakeClock())
    assert not store.record("", "1", _scores(0))  # no id: nobody can refer to it
    assert not store.record("x" * 1000, "1", _scores(0))
    assert not store.record("y", "1", {"OTHER": np.zeros((1, 4))})  # output not returned
    assert store.kept == 0


def test_unknown_model_is_refused_and_figures_exported() -> None:
    clock = FakeClock()
    monitors = Monitors()
    store = monitors.add_feedback(_classifier(clock))
    assert monitors.add_feedback(_classifier(clock)) is store  # one store per model
    with pytest.raises(ModelNotFound):
        monitors.feedback("nope", "r", 1)
    store.record("r", "1", _scores(2))
    monitors.feedback("m", "r", 0)
    with pytest.raises(PredictionNotFound):
        monitors.feedback("m", "missing", 0)
    registry = CollectorRegistry()
    registry.register(MonitoringCollector(monitors))
    text = generate_latest(registry).decode()
    assert 'convoy_feedback_accuracy{model="m",version="1"} 0.0' in text
    assert 'convoy_feedback_reference_accuracy{model="m",version="1"} 0.9' in text
    assert 'convoy_feedback_window_size{model="m",version="1"} 1.0' in text
    assert 'convoy_feedback_accepted_total{model="m",version="1"} 1.0' in text
    assert 'convoy_feedback_refused_total{model="m",reason="unknown_id"} 1.0' in text
    assert 'convoy_feedback_refused_total{model="",reason="unknown_model"} 1.0' in text


def test_a_reload_applies_its_feedback_settings_and_keeps_what_still_means_the_same() -> None:
    clock = FakeClock()
    monitors = Monitors()
    old = ModelMonitoring("m", "1", None, _classifier(clock))
    monitors.activate(old)
    store = old.feedback
    assert store is not None
    for i in range(3):
        store.record(f"r{i}", "1", _scores(1))
    monitors.feedback("m", "r0", 1)
    monitors.feedback("m", "r1", 0)
    failed = ModelMonitoring("m", "1", None, _classifier(clock, reference_accuracy=0.5))
    monitors.detach(failed)  # prepared by a reload that failed: never served
    assert store.params.reference_accuracy == 0.9
    new = ModelMonitoring("m", "1", None, _classifier(clock, reference_accuracy=0.8, window=1))
    monitors.activate(new)  # the reload serves
    assert new.feedback is store and store.params.reference_accuracy == 0.8
    [figure] = store.figures()
    assert (figure.window, figure.rolling, figure.reference, figure.accepted) == (1, 0.0, 0.8, 2)
    assert monitors.feedback("m", "r2", 1).correct  # recorded before the reload
    monitors.detach(old)
    assert monitors.feedback_store("m") is store
    # Another question (the task changed): the old figures would answer the wrong one.
    store.record("r3", "1", _scores(1))
    regression = dataclasses.replace(store.params, task="regression", reference_accuracy=None)
    monitors.activate(ModelMonitoring("m", "1", None, FeedbackStore("m", regression, True)))
    assert store.params.task == "regression" and store.figures() == [] and store.kept == 0
