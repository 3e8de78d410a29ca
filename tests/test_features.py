"""Feature lookups without a server: the feast_* parameters, FeatureBackend's batch
semantics against a fake online store, the skew arithmetic, and Feast kept out of
`convoy serve`'s imports."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from convoy.backends.base import AddedInputs, RequestInputs
from convoy.config import TensorSpec, feature_spec
from convoy.errors import ConfigError, InternalError, InvalidInput, Unavailable
from convoy.features.backend import FeatureBackend
from convoy.features.cli import failing
from convoy.features.lookup import entity_values
from convoy.features.skew import Offline, Served, _complete, _items, compare, offline

from .conftest import ROOT

F = TensorSpec("F", "FP32", (2,))
OTHER = TensorSpec("X", "FP32", (1,))
BASE = {
    "feast_repo": "features",
    "feast_features": "stats:age,stats:score",
    "feast_entities": "user_id:USER",
    "feast_output": "F",
}


def spec(**changes: str) -> Any:
    return feature_spec({**BASE, **changes}, (F, OTHER), "m/config.pbtxt")


def test_callers_send_entity_keys_and_the_runtime_gets_its_own_inputs() -> None:
    features = spec()
    assert [(t.name, t.datatype, t.dims) for t in features.caller_inputs] == [
        ("X", "FP32", (1,)),
        ("USER", "INT64", (1,)),
    ]
    assert features.model_inputs == (F, OTHER)
    assert features.names == ("age", "score")
    assert [t.name for t in features.captured] == ["age", "age__ts", "score", "score__ts"]
    assert feature_spec({}, (F,), "p") is None


@pytest.mark.parametrize(
    ("changes", "parameter", "words"),
    [
        ({"feast_repo": "../elsewhere"}, "feast_repo", "inside the model directory"),
        ({"feast_feature_service": "svc"}, "feast_features", "either"),
        ({"feast_features": ""}, "feast_features", "either"),
        ({"feast_features": "age,stats:score"}, "feast_features", "'age'"),
        ({"feast_features": "stats:age"}, "feast_output", "1 features fill it"),
        ({"feast_features": "a:X,b:Y"}, "feast_features", "not unique"),
        ({"feast_features": "a:USER,b:Y"}, "feast_features", "not unique"),
        ({"feast_output": "G"}, "feast_output", "'G' is not an input"),
        ({"feast_output": "X"}, "feast_output", "dims"),
        ({"feast_entities": "user_id"}, "feast_entities", "entity_key:INPUT"),
        ({"feast_entities": "user_id:F"}, "feast_entities", "fill"),
        ({"feast_entities": "user_id:X"}, "feast_entities", "INT64 or BYTES"),
        ({"feast_missing": "zero"}, "feast_missing", "error, default:<value>, nan"),
        ({"feast_missing": "default:abc"}, "feast_missing", "not a number"),
    ],
)
def test_each_bad_parameter_is_named(changes: dict[str, str], parameter: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec(**changes)
    assert info.value.field == f"parameters.{parameter}"
    assert words in info.value.problem


def test_feast_parameters_without_a_repository_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"parameters\.feast_output"):
        feature_spec({"feast_output": "F"}, (F,), "p")
    ints = TensorSpec("F", "INT64", (2,))
    with pytest.raises(ConfigError, match="nan needs a floating input"):
        feature_spec({**BASE, "feast_missing": "nan"}, (ints,), "p")


# -- FeatureBackend against a fake online store ------------------------------------------


class Value:
    def __init__(self, value: float | None) -> None:
        self.double_val = value

    def WhichOneof(self, _: str) -> str | None:  # protobuf's name
        return None if self.double_val is None else "double_val"


class Down(Exception):
    pass


Down.__name__ = "ConnectionError"  # as redis-py's: matched by name, no redis import


@dataclass
class FakeStore:
    """user -> (age, score), timestamps 1000 s after the epoch; no row for others."""

    rows: Mapping[int, tuple[float, float]]
    calls: list[list[int]] = field(default_factory=list)
    down: bool = False
    stale: frozenset[int] = frozenset()  # users whose rows are older than the view's ttl
    fails: Exception | None = None

    def get_online_features(self, features: list[str], entity_rows: dict[str, list[int]]) -> Any:
        if self.down:
            raise Down("connection refused")
        if self.fails is not None:
            raise self.fails
        users = entity_rows["user_id"]
        if any(u >= 2**31 for u in users):  # as Feast with an INT32 entity: the whole call
            raise ValueError("Value out of range for int32")
        self.calls.append(list(users))
        results = []
        for j in range(2):
            found = [self.rows.get(u) for u in users]
            results.append(
                SimpleNamespace(
                    values=[Value(None if r is None else r[j]) for r in found],
                    statuses=[
                        1 if r is not None else 4 if u in self.stale else 3
                        for u, r in zip(users, found, strict=True)
                    ],
                    event_timestamps=[SimpleNamespace(seconds=1000, nanos=0) for _ in found],
                )
            )
        # Feast answers in its own order: score before age.
        names = SimpleNamespace(val=["score", "age"])
        proto = SimpleNamespace(
            metadata=SimpleNamespace(feature_names=names), results=results[::-1]
        )
        return SimpleNamespace(proto=proto)


class Doubler:
    """The runtime: Y = 2 * F; counts its runs."""

    device = "cpu"

    def __init__(self) -> None:
        self.runs: list[int] = []

    def run(self, inputs: Mapping[str, Any], output_names: Sequence[str]) -> dict[str, Any]:
        self.runs.append(inputs["F"].shape[0])
        assert set(inputs) == {"F"}  # the entity input never reaches the model
        return {"Y": inputs["F"] * 2}

    def close(self) -> None:
        pass


def request(*users: int) -> RequestInputs:
    return RequestInputs("r", {"USER": np.array(users, np.int64).reshape(-1, 1)}, ("Y",))


def backend(store: FakeStore, **changes: str) -> tuple[FeatureBackend, Doubler, list[Any]]:
    observed: list[Any] = []
    inner = Doubler()
    features = feature_spec({**BASE, **changes}, (F,), "p")
    assert features is not None
    made = FeatureBackend(
        inner, store, features, True, lambda *a: observed.append(a), lambda: 1060.0
    )
    return made, inner, observed


def test_one_lookup_and_one_run_per_batch_and_a_bad_key_fails_its_request_alone() -> None:
    store = FakeStore({1: (10.0, 0.5), 2: (20.0, 1.5), 3: (30.0, 2.5)})
    made, inner, observed = backend(store)
    answers = made.run_requests([request(1, 2), request(99), request(3)])
    assert store.calls == [[1, 2, 99, 3]]
    assert inner.runs == [3]  # the two good requests, run together
    first, bad, last = answers
    assert isinstance(bad, InvalidInput) and "user_id=99" in bad.message
    assert isinstance(first, AddedInputs) and isinstance(last, AddedInputs)
    assert first.outputs["Y"].tolist() == [[20.0, 1.0], [40.0, 3.0]]
    assert last.outputs["Y"].tolist() == [[60.0, 5.0]]
    assert first.inputs["age"].tolist() == [[10.0], [20.0]]
    assert first.inputs["score__ts"].tolist() == [[1_000_000_000], [1_000_000_000]]
    _, missing, ages = observed[0]
    assert missing == {"age": 1, "score": 1}
    assert ages["age"] == [60.0, 60.0, 60.0]


def test_default_and_nan_policies_fill_what_is_missing() -> None:
    made, _, _ = backend(FakeStore({1: (10.0, 0.5)}), feast_missing="default:-1")
    (answer,) = made.run_requests([request(1, 7)])
    assert isinstance(answer, AddedInputs)
    assert answer.outputs["Y"].tolist() == [[20.0, 1.0], [-2.0, -2.0]]
    assert answer.inputs["age__ts"].tolist() == [[1_000_000_000], [0]]
    made, _, _ = backend(FakeStore({}), feast_missing="nan")
    (answer,) = made.run_requests([request(5)])
    assert isinstance(answer, AddedInputs) and np.isnan(answer.outputs["Y"]).all()


def test_an_unreachable_store_fails_the_batch_unavailable() -> None:
    made, inner, _ = backend(FakeStore({1: (1.0, 1.0)}, down=True))
    with pytest.raises(Unavailable, match="feature store unreachable"):
        made.run_requests([request(1), request(1)])
    assert inner.runs == []


def test_a_key_out_of_its_feast_type_range_fails_its_request_alone() -> None:
    store = FakeStore({1: (1.0, 1.0)})
    features = feature_spec(BASE, (F,), "p")
    assert features is not None
    inner = Doubler()
    made = FeatureBackend(
        inner, store, features, True, lambda *a: None, feast_key_types={"user_id": "INT32"}
    )
    bad, good = made.run_requests([request(1, 2**31), request(1)])
    assert isinstance(bad, InvalidInput)
    assert "user_id=2147483648" in bad.message and "INT32" in bad.message
    assert isinstance(good, AddedInputs) and store.calls == [[1]]


def test_a_stale_value_is_said_to_be_stale_not_unknown() -> None:
    made, _, _ = backend(FakeStore({1: (1.0, 1.0)}, stale=frozenset({7})))
    stale, unknown = made.run_requests([request(7), request(8)])
    assert isinstance(stale, InvalidInput) and isinstance(unknown, InvalidInput)
    assert "user_id=7" in stale.message and "stale (outside the view's ttl)" in stale.message
    assert "unknown entity user_id=8" in unknown.message


class OperationalError(Exception):  # as sqlite3's: matched by name
    pass


@pytest.mark.parametrize(
    ("message", "kind"),
    [("database is locked", Unavailable), ("no such table: p_user_stats", InternalError)],
)
def test_only_a_busy_or_unopenable_sqlite_file_is_unavailable(
    message: str, kind: type[Exception]
) -> None:
    made, _, _ = backend(FakeStore({1: (1.0, 1.0)}, fails=OperationalError(message)))
    with pytest.raises(kind, match=message):
        made.run_requests([request(1)])


def test_closing_releases_the_online_store_client() -> None:
    closed: list[str] = []
    online = SimpleNamespace(_conn=SimpleNamespace(close=lambda: closed.append("sqlite")))
    store = SimpleNamespace(_provider=SimpleNamespace(_online_store=online))
    features = feature_spec(BASE, (F,), "p")
    assert features is not None
    FeatureBackend(Doubler(), store, features, True, lambda *a: None).close()
    assert closed == ["sqlite"] and online._conn is None


def test_a_request_without_its_entity_input_is_refused_alone() -> None:
    made, _, _ = backend(FakeStore({1: (1.0, 1.0)}))
    empty = RequestInputs("e", {}, ("Y",))
    bad, good = made.run_requests([empty, request(1)])
    assert isinstance(bad, InvalidInput) and "USER" in bad.message
    assert isinstance(good, AddedInputs)
    (only,) = made.run_requests([empty])
    assert isinstance(only, InvalidInput)


# -- skew arithmetic ---------------------------------------------------------------------


def test_compare_counts_mismatches_missing_rows_and_staleness() -> None:
    served = Served(
        keys={"user_id": [1, 2, 3, 4]},
        event_us=np.full(4, 10_000_000, np.int64),
        # age: FP32 rounding of 0.1 is no mismatch; row 3 differs; row 4 was missing.
        values=np.array([[np.float32(0.1), 5], [2.0, 5], [3.5, 5], [0, 5]], np.float64),
        stamps_us=np.array([[1, 1_000_000], [1, 1_000_000], [1, 1_000_000], [0, 1_000_000]]),
    )
    offline = Offline(
        values=np.array([[0.1, 5], [2.0, 6], [3.0, np.nan], [4.0, 5]]),
        stamps_us=np.array([[1, 1_000_000], [1, 4_000_000], [1, 0], [1, 1_000_000]]),
    )
    found = compare(served, offline, ("age", "clicks"), "FP32")
    assert found["age"].mismatch_rate == pytest.approx(1 / 3)
    assert found["age"].missing == 1
    assert found["age"].mean_abs_diff == pytest.approx(0.5 / 3)
    assert found["age"].staleness_s == 0.0
    # clicks: row 2 differs and is 3 s behind; row 3 has no offline value (a mismatch).
    assert found["clicks"].mismatch_rate == pytest.approx(2 / 4)
    assert found["clicks"].staleness_s == pytest.approx(1.0)
    assert found["clicks"].missing == 0


def test_a_feature_the_online_store_never_served_fails_the_missing_rate() -> None:
    served = Served(
        keys={"user_id": [1, 2]},
        event_us=np.full(2, 10_000_000, np.int64),
        values=np.zeros((2, 2)),
        stamps_us=np.array([[0, 1_000_000], [0, 1_000_000]]),  # age: never materialised
    )
    offline = Offline(values=np.zeros((2, 2)), stamps_us=None)
    found = compare(served, offline, ("age", "clicks"), "FP32")
    assert found["age"].mismatch_rate == 0.0 and found["age"].missing == 2
    assert failing(found, 2, 0.0, 0.5) == ["age"]
    assert failing(found, 2, 0.0, 1.0) == []


def test_captured_rows_without_served_features_are_skipped_not_misaligned() -> None:
    import pyarrow as pa

    one = pa.list_(pa.list_(pa.int64(), 1))
    users = pa.array([[[1], [2]], [[3]], [[4]], [[5], [6]], [[7]]], one)
    # Row 1: a cache hit captured without features; row 2: a null item; row 3: too few.
    age = pa.array([[[10.0], [20.0]], None, [[None]], [[50.0]], [[70.0]]],
                   pa.list_(pa.list_(pa.float64(), 1)))  # fmt: skip
    inputs = pa.StructArray.from_arrays([users, age], ["USER", "age"])
    complete = _complete(inputs, ["USER", "age"])
    assert complete.tolist() == [True, False, False, False, True]
    counts, columns = _items(inputs.filter(complete), ["USER", "age"])
    assert counts.tolist() == [2, 1]
    assert columns["USER"] == [1, 2, 7] and columns["age"] == [10.0, 20.0, 70.0]
    # A model without a batch dimension: a null timestamp field, row by row.
    flat = pa.array([[1], [2], None], pa.list_(pa.int64(), 1))
    stamps = pa.array([[5], [None], [7]], pa.list_(pa.int64(), 1))
    inputs = pa.StructArray.from_arrays([flat, stamps], ["USER", "age__ts"])
    assert _complete(inputs, ["USER", "age__ts"]).tolist() == [True, False, False]


def test_staleness_left_out_says_why(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("pandas")

    def historical(entity_df: Any, features: list[str]) -> Any:
        return SimpleNamespace(to_df=lambda: entity_df.assign(age=1.0, score=2.0))

    def no_provider() -> Any:
        raise RuntimeError("no offline store here")

    store = SimpleNamespace(get_historical_features=historical, _get_provider=no_provider)
    served = Served(
        keys={"user_id": [1, 2]},
        event_us=np.array([1_000_000, 2_000_000], np.int64),
        values=np.ones((2, 2)),
        stamps_us=np.ones((2, 2), np.int64),
    )
    found = offline(store, spec(), served)
    assert found.values.tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert found.stamps_us is None
    assert found.stamps_error == "RuntimeError: no offline store here"
    assert "no offline store here" in caplog.text


def test_convoy_serve_does_not_import_feast() -> None:
    code = (
        "import sys, convoy.cli, convoy.app, convoy.repository.manager, convoy.features.cli; "
        "convoy.cli.build_parser(); assert 'feast' not in sys.modules, 'feast imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_entity_keys_as_feast_takes_them() -> None:
    assert entity_values(np.array([[3], [4]], np.int64), "INT64") == [3, 4]
    keys = np.array([[b"alice"], [b"b\xc3\xb6b"]], dtype=object)
    assert entity_values(keys, "BYTES") == ["alice", "b\u00f6b"]
    with pytest.raises(InvalidInput, match="UTF-8"):
        entity_values(np.array([b"\xff"], dtype=object), "BYTES")
    made, _, _ = backend(FakeStore({1: (1.0, 1.0)}))
    (empty,) = made.run_requests([RequestInputs("z", {"USER": np.zeros((0, 1), np.int64)}, ("Y",))])
    assert isinstance(empty, InvalidInput) and "no keys" in empty.message


def test_a_replay_reads_the_entity_keys_back_not_the_looked_up_features(tmp_path: Path) -> None:
    """Captured with the features; read back for a replay without them."""
    import datetime as dt

    from convoy.capture.replay import read_requests
    from convoy.capture.writer import CaptureWriter
    from convoy.config import CaptureConfig, read_model_config, validate_model_config

    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    params = {**BASE, "feast_features": "stats:age,stats:score", "capture_sample_rate": "1"}
    text = ", ".join(f'{{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    (folder / "config.pbtxt").write_text(
        'name: "m"\nbackend: "convoy_python"\nmax_batch_size: 4\n'
        'input [ { name: "F" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        f"parameters [ {text} ]\n"
    )
    model = validate_model_config(read_model_config(folder), "m/config.pbtxt", "m")
    users = np.array([[1], [2]], np.int64)
    looked = {
        "age": np.array([[10.0], [20.0]], np.float32),
        "age__ts": np.array([[5], [6]], np.int64),
        "score": np.array([[0.5], [1.5]], np.float32),
        "score__ts": np.array([[5], [6]], np.int64),
    }
    now_us = int(dt.datetime.now(dt.UTC).timestamp() * 1e6)
    row = (
        "r",
        now_us,
        "none",
        "grpc",
        "OK",
        None,
        1,
        1,
        1,
        False,
        None,
        *[{"USER": users, **looked}.get(t.name) for t in model.captured_inputs],
        np.zeros((2, 1), np.float32),
    )  # fmt: skip: rows.Row's layout
    uri = str(tmp_path / "capture")
    writer = CaptureWriter(CaptureConfig(uri=uri, flush_s=60))
    writer.open()
    assert writer.put(model, "1", row, 100)
    writer.close(30)
    (back,) = read_requests(uri, "m")
    assert list(back.inputs) == ["USER"]
    assert back.inputs["USER"].tolist() == [[1], [2]]
