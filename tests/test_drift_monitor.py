"""The sampler (bounded, O(1) per request), the monitor driven by run_once() and an
injected clock, and the Prometheus figures the exporter reads from it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from convoy.config import TensorSpec
from convoy.monitoring.exporter import MonitoringCollector
from convoy.monitoring.monitor import ModelMonitor
from convoy.monitoring.params import parse_monitoring_params
from convoy.monitoring.registry import Monitors
from convoy.monitoring.sampler import ROW_BUDGET_BYTES, SampledTensor, Sampler
from tests.drift_helpers import model_spec, scores_of, tabular_spec, write_reference


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _monitor(tmp_path: Path, **extra: str) -> tuple[ModelMonitor, FakeClock]:
    write_reference(tmp_path, np.random.default_rng(0))
    spec = tabular_spec({"drift_reference": "reference.npz", "drift_window": "100", **extra})
    drift = parse_monitoring_params(spec, "config.pbtxt").drift
    assert drift is not None
    clock = FakeClock()
    return ModelMonitor.for_model(spec, "1", tmp_path, drift, clock=clock), clock


def _requests(
    monitor: ModelMonitor, rng: np.random.Generator, count: int, shift: float = 0.0
) -> None:
    for _ in range(count):
        x = rng.standard_normal((4, 16)).astype(np.float32)
        x[:, 3] += shift
        monitor.sampler.offer({"INPUT0": x}, {"SCORES": scores_of(x)})


def test_sampler_memory_is_bounded_when_nobody_takes() -> None:
    tensor = SampledTensor(TensorSpec("X", "FP32", (16,)))
    sampler = Sampler([tensor], batched=True, window=48, rows_per_request=4, max_pending=2)
    batch = np.ones((8, 16), np.float32)
    for _ in range(1000):  # 4 rows of each: 83 full windows of 48
        sampler.offer({"X": batch}, {})
    assert sampler.buffered_windows == 2
    assert sampler.dropped == 81
    windows = sampler.take()
    assert [w.shape for _, w in windows] == [(48, 16), (48, 16)]
    assert sampler.take() == []


def test_sampler_copies_rows_and_respects_rate_and_budget() -> None:
    image = SampledTensor(TensorSpec("IMG", "FP32", (3, 64, 64)))  # 48 KiB a row
    text = SampledTensor(TensorSpec("TEXT", "BYTES", (1,)))
    sampler = Sampler([image, text], batched=True, window=4, sample_rate=0.25, rows_per_request=4)
    batch = np.zeros((4, 3, 64, 64), np.float32)
    strings = np.array([[b"a"], [b"b"], [b"c"], [b"d"]], dtype=object)
    for i in range(16):
        batch[:] = i
        sampler.offer({"IMG": batch, "TEXT": strings}, {})
    assert (sampler.offered, sampler.sampled) == (16, 4)  # one request in four
    windows = dict(sampler.take())
    assert 3 * 64 * 64 * 4 > ROW_BUDGET_BYTES // 2  # so only one image row fits the budget
    assert windows["IMG"].shape == (4, 3, 64, 64)
    # Rows were copied when sampled (requests 3, 7, 11, 15), not kept as views.
    assert windows["IMG"][:, 0, 0, 0].tolist() == [3.0, 7.0, 11.0, 15.0]
    assert windows["TEXT"].tolist() == [b"a", b"b", b"c", b"d"]


def test_monitor_scores_full_windows_and_keeps_the_latest(tmp_path: Path) -> None:
    monitor, clock = _monitor(tmp_path)
    rng = np.random.default_rng(1)
    assert monitor.run_once() == 0  # nothing full yet
    _requests(monitor, rng, 25)  # 100 rows: one window per tensor
    assert monitor.run_once() == 2
    clock.now = 160.0
    _requests(monitor, rng, 50, shift=1.0)
    assert monitor.run_once() == 4
    assert monitor.window_count == 6
    status = {t.name: t for t in monitor.status().tensors}
    inputs = status["INPUT0"]
    assert (inputs.windows, inputs.scored_at_s, inputs.state) == (3, 160.0, "scored")
    assert inputs.result is not None and inputs.result.is_drift
    assert [f.name for f in inputs.result.features if f.is_drift] == ["3"]
    # Feature 3 feeds class 3's score: the predicted classes shift too.
    assert status["SCORES"].result is not None and status["SCORES"].result.is_drift


def test_first_n_collects_a_reference_then_tests(tmp_path: Path) -> None:
    spec = tabular_spec({"drift_reference": "first:200", "drift_window": "100"})
    drift = parse_monitoring_params(spec, "config.pbtxt").drift
    assert drift is not None
    monitor = ModelMonitor.for_model(spec, "1", tmp_path, drift)
    rng = np.random.default_rng(2)
    _requests(monitor, rng, 25)
    monitor.run_once()
    collecting = {t.name: (t.state, t.reference_size) for t in monitor.status().tensors}
    assert collecting["INPUT0"] == ("collecting_reference", 100)
    _requests(monitor, rng, 25)
    monitor.run_once()
    _requests(monitor, rng, 25, shift=1.5)
    monitor.run_once()
    status = {t.name: t for t in monitor.status().tensors}
    assert status["INPUT0"].test == "numeric" and status["INPUT0"].reference_size == 200
    assert status["INPUT0"].result is not None and status["INPUT0"].result.is_drift


def test_thread_starts_and_stops_under_its_owner(tmp_path: Path) -> None:
    monitor, _ = _monitor(tmp_path, drift_interval_s="3600")
    monitor.start()
    monitor.start()  # idempotent: still one thread
    threads = [t for t in threading.enumerate() if t.name == "drift-m:1"]
    assert len(threads) == 1
    monitor.stop()
    assert not threads[0].is_alive()
    monitor.stop()


def test_exporter_names_model_input_and_feature(tmp_path: Path) -> None:
    monitor, _ = _monitor(tmp_path)
    monitors = Monitors()
    monitors.add_monitor(monitor)
    registry = CollectorRegistry()
    registry.register(MonitoringCollector(monitors))
    before = generate_latest(registry).decode()
    assert 'convoy_drift_reference_size{input="INPUT0",model="m",version="1"} 2000.0' in before
    assert "convoy_drift_detected{" not in before  # no window yet: no figure, not a 0
    _requests(monitor, np.random.default_rng(3), 25, shift=1.0)
    monitor.run_once()
    text = generate_latest(registry).decode()
    assert 'convoy_drift_detected{input="INPUT0",model="m",version="1"} 1.0' in text
    assert 'convoy_drift_windows_total{input="INPUT0",model="m",version="1"} 1.0' in text
    assert 'convoy_drift_alarms_total{input="INPUT0",model="m",version="1"} 1.0' in text
    assert 'convoy_drift_p_value{feature="3",input="INPUT0",model="m",version="1"}' in text
    assert 'convoy_drift_score{feature="",input="INPUT0",model="m",version="1"}' in text
    assert 'convoy_drift_detected{input="SCORES",model="m",version="1"} 1.0' in text
    p_values = {
        line.split('feature="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("convoy_drift_p_value{") and 'input="INPUT0"' in line
    }
    assert p_values["3"] < 0.05 < p_values["0"]
    monitors.remove_monitor("m", "1")
    assert "convoy_drift_detected{" not in generate_latest(registry).decode()


def test_attach_observe_detach(tmp_path: Path) -> None:
    write_reference(tmp_path, np.random.default_rng(4))
    spec = tabular_spec(
        {
            "drift_reference": "reference.npz",
            "drift_window": "100",
            "drift_interval_s": "3600",
            "feedback_reference_accuracy": "0.8",
        }
    )
    monitors = Monitors()
    handle = monitors.attach(spec, "1", tmp_path, "config.pbtxt", labels={"SCORES": ["a", "b"]})
    assert handle.active and handle.drift is not None
    try:
        assert monitors.monitors("m") == [handle.drift]
        x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
        handle.observe("req-1", {"INPUT0": x}, {"SCORES": scores_of(x)})
        assert handle.drift.sampler.sampled == 1
        top = int(np.argmax(scores_of(x)[0]))
        assert monitors.feedback("m", "req-1", top).correct is True
    finally:
        monitors.detach(handle)
    assert monitors.monitors() == [] and monitors.feedback_store("m") is None
    plain = monitors.attach(tabular_spec(), "1", tmp_path, "config.pbtxt")
    assert not plain.active
    plain.observe("r", {}, {})  # a model without monitoring: observe does nothing


def test_a_failing_observation_never_reaches_the_caller(tmp_path: Path) -> None:
    write_reference(tmp_path, np.random.default_rng(6))
    spec = tabular_spec({"drift_reference": "reference.npz", "drift_interval_s": "3600"})
    monitors = Monitors()
    handle = monitors.attach(spec, "1", tmp_path, "config.pbtxt")
    try:
        wrong = np.zeros((2, 15), np.float32)  # a shape the sampler's buffer cannot take
        handle.observe("r", {"INPUT0": wrong}, {})
        handle.observe("r", {"INPUT0": wrong}, {})
        assert handle.failures == 2
        good = np.zeros((2, 16), np.float32)
        handle.observe("r", {"INPUT0": good}, {})
        assert handle.failures == 2
    finally:
        monitors.detach(handle)


def test_a_reload_keeps_the_new_versions_monitoring(tmp_path: Path) -> None:
    write_reference(tmp_path, np.random.default_rng(7))
    spec = tabular_spec(
        {
            "drift_reference": "reference.npz",
            "drift_interval_s": "3600",
            "feedback_reference_accuracy": "0.8",
        }
    )
    monitors = Monitors()
    old = monitors.attach(spec, "1", tmp_path, "config.pbtxt")
    new = monitors.attach(spec, "1", tmp_path, "config.pbtxt")  # before the old one closes
    monitors.detach(old)
    try:
        assert monitors.monitors() == [new.drift]
        assert monitors.feedback_store("m") is new.feedback
    finally:
        monitors.detach(new)
    assert monitors.monitors() == [] and monitors.feedback_store("m") is None


def test_each_tensor_keeps_its_own_pending_windows() -> None:
    """A tensor whose windows fill faster (more rows sampled per request) must not evict
    another tensor's windows while the scoring thread is behind."""
    image = SampledTensor(TensorSpec("INPUT", "FP32", (3, 64, 64)))  # one row per request
    logits = SampledTensor(TensorSpec("LOGITS", "FP32", (10,)), is_output=True)  # four
    sampler = Sampler([image, logits], batched=True, window=8, rows_per_request=4, max_pending=2)
    taken: dict[str, int] = {"INPUT": 0, "LOGITS": 0}
    for _ in range(5):
        for _ in range(40):
            sampler.offer(
                {"INPUT": np.zeros((4, 3, 64, 64), np.float32)},
                {"LOGITS": np.zeros((4, 10), np.float32)},
            )
        for name, _window in sampler.take():
            taken[name] += 1
    # 40 requests fill 5 INPUT windows and 20 LOGITS windows; 2 of each wait per pass.
    assert taken == {"INPUT": 10, "LOGITS": 10}


def test_a_reload_that_fails_leaves_the_serving_versions_monitor(tmp_path: Path) -> None:
    """A reload prepares the new version's monitoring before it knows whether the
    version will load; until it serves, and for good if it fails, the registry keeps
    the monitor of the version that serves, with its figures."""
    write_reference(tmp_path, np.random.default_rng(8))
    spec = tabular_spec({"drift_reference": "reference.npz", "drift_window": "100"})
    monitors = Monitors()
    serving = monitors.attach(spec, "1", tmp_path, "config.pbtxt")
    assert serving.drift is not None
    try:
        _requests(serving.drift, np.random.default_rng(9), 25, shift=1.0)
        serving.drift.run_once()
        failed = monitors.prepare(spec, "1", tmp_path, "config.pbtxt")  # a reload starts
        assert monitors.monitors("m") == [serving.drift]
        monitors.detach(failed)  # its model file would not load
        assert monitors.monitors("m") == [serving.drift]
        assert serving.drift.window_count == 2  # INPUT0 and SCORES, as before
        succeeded = monitors.prepare(spec, "1", tmp_path, "config.pbtxt")
        monitors.activate(succeeded)  # the next reload serves
        assert monitors.monitors("m") == [succeeded.drift]
        monitors.detach(serving)  # the old version closes
        assert monitors.monitors("m") == [succeeded.drift]
        monitors.detach(succeeded)
    finally:
        monitors.detach(serving)
    assert monitors.monitors() == []


def test_a_non_finite_row_is_kept_out_of_a_first_n_reference(tmp_path: Path) -> None:
    """One NaN row among the first N must not leave the reference unusable (NaN
    p-values, never an alarm): it is left out, counted, and the alarm still rises."""
    spec = tabular_spec({"drift_reference": "first:100", "drift_window": "100"})
    drift = parse_monitoring_params(spec, "config.pbtxt").drift
    assert drift is not None
    monitor = ModelMonitor.for_model(spec, "1", tmp_path, drift)
    rng = np.random.default_rng(10)
    poisoned = rng.standard_normal((4, 16)).astype(np.float32)
    poisoned[1] = np.nan  # a whole row: every feature's reference holds a NaN
    monitor.sampler.offer({"INPUT0": poisoned}, {"SCORES": scores_of(poisoned)})
    _requests(monitor, rng, 24)  # the first window: 99 finite rows
    monitor.run_once()
    _requests(monitor, rng, 25)  # completes the reference
    monitor.run_once()
    _requests(monitor, rng, 25, shift=10.0)  # feature 3 moves by 10 sigma
    monitor.run_once()
    status = {t.name: t for t in monitor.status().tensors}
    inputs = status["INPUT0"]
    assert inputs.result is not None and inputs.result.is_drift
    assert 0.0 <= inputs.result.p_value < 0.05
    assert inputs.reference_size == 100
    assert inputs.nonfinite_reference_rows == 1
    assert status["SCORES"].nonfinite_reference_rows == 1


def test_non_finite_window_rows_are_left_out_and_counted(tmp_path: Path) -> None:
    """NaN or infinite rows never decide a window: a classifier's NaN scores would
    all count as one class (argmax picks the NaN), a shift the traffic never had."""
    monitor, _ = _monitor(tmp_path)
    rng = np.random.default_rng(11)
    for i in range(25):
        x = rng.standard_normal((4, 16)).astype(np.float32)
        scores = scores_of(x)
        if i < 3:
            x[0, 2] = (np.nan, np.inf, -np.inf)[i]
        if i < 6:
            scores[:, 3] = np.nan  # 24 rows of scores the model could not compute
        monitor.sampler.offer({"INPUT0": x}, {"SCORES": scores})
    monitor.run_once()
    status = {t.name: t for t in monitor.status().tensors}
    scores_status = status["SCORES"]
    assert scores_status.result is not None and not scores_status.result.is_drift
    assert scores_status.result.window_size == 76
    assert scores_status.nonfinite_window_rows == 24
    inputs = status["INPUT0"]
    assert inputs.nonfinite_window_rows == 3
    assert inputs.result is not None and inputs.result.window_size == 97
    assert not inputs.result.is_drift
    registry = CollectorRegistry()
    monitors = Monitors()
    monitors.add_monitor(monitor)
    registry.register(MonitoringCollector(monitors))
    text = generate_latest(registry).decode()
    window = 'input="INPUT0",model="m",sample="window",version="1"'
    assert f"convoy_drift_nonfinite_rows_total{{{window}}} 3.0" in text
    reference = 'input="INPUT0",model="m",sample="reference",version="1"'
    assert f"convoy_drift_nonfinite_rows_total{{{reference}}} 0.0" in text


def test_sampled_strings_keep_to_the_byte_budget() -> None:
    """BYTES values have no size the config bounds: a sampled request keeps at most
    ROW_BUDGET_BYTES of a tensor's strings alive; strings that do not fit are skipped
    and counted, and the window still fills from the ones that do."""
    text = SampledTensor(TensorSpec("TEXT", "BYTES", (1,)))
    sampler = Sampler([text], batched=True, window=20, rows_per_request=4)
    huge = b"x" * (4 * ROW_BUDGET_BYTES)  # e.g. a whole document pasted into a prompt
    third = b"y" * (ROW_BUDGET_BYTES // 3 + 1)  # two fit a request's budget, not three
    for _ in range(9):
        sampler.offer({"TEXT": np.array([[huge], [third], [third], [third]], dtype=object)}, {})
    sampler.offer({"TEXT": np.array([[b"short"], [b"text"]], dtype=object)}, {})
    windows = [window for _, window in sampler.take()]
    sizes = [len(s) for window in windows for s in window.tolist()]
    assert max(sizes) <= ROW_BUDGET_BYTES
    # Each long request gave the two strings that fit; the window filled all the same.
    assert sizes == [len(third)] * 18 + [5, 4]
    assert sampler.strings_skipped == {"TEXT": 9 * 2}  # the huge one and a third long one


def test_skipped_strings_are_exported(tmp_path: Path) -> None:
    spec = model_spec(
        (TensorSpec("TEXT", "BYTES", (1,)),),
        (TensorSpec("SCORE", "FP32", (1,)),),
        {"drift_reference": "first:20", "drift_window": "20", "drift_interval_s": "3600"},
    )
    monitors = Monitors()
    handle = monitors.attach(spec, "1", tmp_path, "config.pbtxt")
    try:
        big = np.array([[b"x" * (ROW_BUDGET_BYTES + 1)]], dtype=object)
        handle.observe("r", {"TEXT": big}, {"SCORE": np.zeros((1, 1), np.float32)})
        assert handle.drift is not None
        [text] = [t for t in handle.drift.status().tensors if t.name == "TEXT"]
        assert text.strings_skipped == 1
        registry = CollectorRegistry()
        registry.register(MonitoringCollector(monitors))
        exported = generate_latest(registry).decode()
        labels = 'input="TEXT",model="m",version="1"'
        assert f"convoy_drift_strings_skipped_total{{{labels}}} 1.0" in exported
    finally:
        monitors.detach(handle)
