"""Monitoring parameters and reference files: defaults, and errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convoy.config import TensorSpec
from convoy.errors import ConfigError
from convoy.monitoring.monitor import ModelMonitor
from convoy.monitoring.params import DriftParams, parse_monitoring_params
from convoy.monitoring.reference import load_reference
from tests.drift_helpers import model_spec, tabular_spec, write_reference

CONFIG = "/models/m/config.pbtxt"


def test_defaults_are_the_documented_ones() -> None:
    params = parse_monitoring_params(tabular_spec({"drift_reference": "reference.npz"}), CONFIG)
    assert params.drift == DriftParams(reference_file="reference.npz")
    assert params.drift is not None
    assert (params.drift.window, params.drift.significance, params.drift.correction) == (
        200, 0.05, "bonferroni",
    )  # fmt: skip
    assert params.feedback is None


def test_first_n_and_overrides() -> None:
    params = parse_monitoring_params(
        tabular_spec(
            {
                "drift_reference": "first:500",
                "drift_window": "100",
                "drift_correction": "fdr",
                "drift_test": "SCORES:classes, INPUT0:multivariate",
                "feedback_reference_accuracy": "0.9",
            }
        ),
        CONFIG,
    )
    assert params.drift is not None and params.feedback is not None
    assert (params.drift.first_n, params.drift.reference_file) == (500, "")
    assert params.drift.tests == {"SCORES": "classes", "INPUT0": "multivariate"}
    assert params.feedback.task == "classification"
    assert params.feedback.output == "SCORES"
    assert params.feedback.reference_accuracy == 0.9


@pytest.mark.parametrize(
    ("parameters", "field", "problem"),
    [
        ({"drift_reference": "../ref.npz"}, "drift_reference", ".npz file in the model directory"),
        ({"drift_reference": "ref.csv"}, "drift_reference", ".npz"),
        ({"drift_reference": "first:5"}, "drift_reference", "too few"),
        ({"drift_reference": "r.npz", "drift_window": "abc"}, "drift_window", "not an integer"),
        ({"drift_reference": "r.npz", "drift_window": "5"}, "drift_window", ">= 20"),
        ({"drift_reference": "r.npz", "drift_significance": "1.5"}, "drift_significance", "(0, 1)"),
        ({"drift_reference": "r.npz", "drift_correction": "holm"}, "drift_correction", "holm"),
        ({"drift_reference": "r.npz", "drift_sample_rate": "0"}, "drift_sample_rate", "(0, 1]"),
        ({"drift_reference": "r.npz", "drift_test": "NOPE:numeric"}, "drift_test", "NOPE"),
        ({"drift_reference": "r.npz", "drift_test": "INPUT0:fancy"}, "drift_test", "fancy"),
        ({"drift_reference": "r.npz", "drift_windw": "10"}, "drift_windw", "not a monitoring"),
        ({"drift_window": "100"}, "drift_window", "needs parameters.drift_reference"),
        ({"feedback_output": "NOPE"}, "feedback_output", "not an output"),
        ({"feedback_reference_accuracy": "1.5"}, "feedback_reference_accuracy", "(0, 1]"),
        ({"feedback_reference_error": "0.1"}, "feedback_reference_error", "regression"),
        ({"feedback_ttl_s": "-1"}, "feedback_ttl_s", "> 0"),
    ],
)
def test_bad_parameters_name_the_key(parameters: dict[str, str], field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_monitoring_params(tabular_spec(parameters), CONFIG)
    assert err.value.path == CONFIG
    assert err.value.field == f"parameters.{field}"
    assert problem in err.value.problem


def test_regression_task_follows_a_single_value_output() -> None:
    spec = model_spec(
        (TensorSpec("X", "FP32", (3,)),),
        (TensorSpec("Y", "FP32", (1,)),),
        {"feedback_reference_error": "0.2"},
    )
    feedback = parse_monitoring_params(spec, CONFIG).feedback
    assert feedback is not None and feedback.task == "regression"


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("arrays", "field", "problem"),
    [
        ({"INPUT0": np.zeros((50, 16), np.float32), "EXTRA": np.zeros(50)}, "EXTRA", "neither"),
        ({"SCORES": np.zeros((50, 4), np.float32)}, "INPUT0", "missing"),
        ({"INPUT0": np.zeros((50, 15), np.float32)}, "INPUT0", "does not fit dims [16]"),
        ({"INPUT0": np.zeros((50, 16), np.int32)}, "INPUT0", "does not fit FP32"),
        ({"INPUT0": np.full((50, 16), np.nan, np.float32)}, "INPUT0", "NaN"),
        ({"INPUT0": np.zeros((5, 16), np.float32)}, "INPUT0", "at least 20"),
        (
            {"INPUT0": np.zeros((50, 16), np.float32), "SCORES": np.zeros((40, 4), np.float32)},
            "SCORES",
            "sample counts differ",
        ),
    ],
)
def test_reference_errors_name_file_and_field(
    tmp_path: Path, arrays: dict[str, np.ndarray], field: str, problem: str
) -> None:
    path = _save(tmp_path / "reference.npz", **arrays)
    with pytest.raises(ConfigError) as err:
        load_reference(path, tabular_spec())
    assert err.value.path == str(path)
    assert err.value.field == field
    assert problem in err.value.problem


def test_unreadable_and_pickled_references_are_refused(tmp_path: Path) -> None:
    spec = tabular_spec()
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ConfigError, match=r"not a readable \.npz"):
        load_reference(garbage, spec)
    # Object arrays need pickle, which could run code: refused, naming the file.
    pickled = _save(tmp_path / "pickled.npz", INPUT0=np.array([[1]] * 30, dtype=object))
    with pytest.raises(ConfigError, match="need pickle") as err:
        load_reference(pickled, spec)
    assert (err.value.path, err.value.field) == (str(pickled), "INPUT0")
    with pytest.raises(ConfigError, match="does not exist"):
        load_reference(tmp_path / "absent.npz", spec)


def test_bytes_reference_from_string_arrays(tmp_path: Path) -> None:
    spec = model_spec((TensorSpec("TEXT", "BYTES", (1,)),), (TensorSpec("E", "FP32", (4,)),))
    path = _save(tmp_path / "r.npz", TEXT=np.array([["héllo world"]] * 30))
    reference = load_reference(path, spec)
    assert reference.arrays["TEXT"].dtype == object
    assert reference.arrays["TEXT"][0, 0] == "héllo world".encode()


def test_a_monitor_loads_its_reference_from_the_model_directory(tmp_path: Path) -> None:
    write_reference(tmp_path, np.random.default_rng(0))
    spec = tabular_spec({"drift_reference": "reference.npz"})
    drift = parse_monitoring_params(spec, CONFIG).drift
    assert drift is not None
    monitor = ModelMonitor.for_model(spec, "1", tmp_path, drift)
    status = monitor.status()
    assert status.reference == str(tmp_path / "reference.npz")
    tests = {t.name: (t.test, t.reference_size, t.state) for t in status.tensors}
    # SCORES has a label file: a classifier, so prediction drift is class frequency.
    assert tests == {
        "INPUT0": ("numeric", 2000, "waiting_for_window"),
        "SCORES": ("classes", 2000, "waiting_for_window"),
    }
