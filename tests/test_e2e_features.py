"""Features from Feast at inference time, end to end: a real Feast repository (Parquet
offline sources, FeatureStore.apply, materialize into the SQLite online store) beside
convoy_python models whose input F is filled from it, served by the real server with
capture on, called through tritonclient."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .feast_repo import (
    FEATURES,
    FeatureRepo,
    age,
    build_feature_repo,
    clicks,
    expected,
    score,
    write_feature_model,
)

pytestmark = pytest.mark.e2e
pytest.importorskip("feast", reason="feast missing: the `feast` extra (pulled by `test`)")
duckdb = pytest.importorskip("duckdb", reason="duckdb missing: a test extra")

ENSEMBLE = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "USER_ID" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] } ]
ensemble_scheduling {
  step [ { model_name: "scored" model_version: -1
           input_map { key: "USER" value: "USER_ID" } output_map { key: "Y" value: "SCORE" } } ]
}
"""


@pytest.fixture(scope="module")
def feature_repo(tmp_path_factory: pytest.TempPathFactory) -> FeatureRepo:
    return build_feature_repo(tmp_path_factory.mktemp("feast") / "repo")


@pytest.fixture(scope="module")
def served(
    feature_repo: FeatureRepo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    models = tmp_path_factory.mktemp("models")
    capture = tmp_path_factory.mktemp("capture")
    repo = feature_repo.root
    write_feature_model(models, "scored", repo, parameters={"capture_sample_rate": "1"})
    write_feature_model(models, "with_default", repo, parameters={"feast_missing": "default:-1"})
    write_feature_model(models, "with_nan", repo, parameters={"feast_missing": "nan"})
    write_feature_model(
        models, "by_service", repo, max_batch_size=0,
        parameters={"feast_features": "", "feast_feature_service": "scoring"},
    )  # fmt: skip
    write_feature_model(models, "no_repo", repo, parameters={"feast_repo": "elsewhere"})
    write_feature_model(models, "bad_view", repo, parameters={"feast_features": "nope:age,a:b,c:d"})
    (models / "pipeline").mkdir()
    (models / "pipeline" / "1").mkdir()
    (models / "pipeline" / "config.pbtxt").write_text(ENSEMBLE)
    server = start_server(models, "--capture-dir", str(capture), "--capture-flush-secs", "1")
    yield server, capture
    server.stop()


@pytest.fixture()
def client(served: tuple[ServerProcess, Path]) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(served[0].url)
    yield c
    c.close()


def users(*ids: int, name: str = "USER") -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, [len(ids), 1], "INT64")
    x.set_data_from_numpy(np.array(ids, np.int64).reshape(-1, 1))
    return x


def test_answers_are_the_model_applied_to_the_stored_features(client: object) -> None:
    result = client.infer("scored", [users(1, 2, 7)])  # type: ignore[attr-defined]
    assert result.as_numpy("Y").reshape(-1).tolist() == pytest.approx(
        [expected(1), expected(2), expected(7)]
    )
    # Many callers at once: their rows are looked up together, each answered its own.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda u: client.infer("scored", [users(u)]), range(1, 17)))  # type: ignore[attr-defined]
    assert [a.as_numpy("Y").item() for a in answers] == pytest.approx(
        [expected(u) for u in range(1, 17)]
    )


def test_feature_service_and_a_model_without_batching(client: object) -> None:
    x = grpcclient.InferInput("USER", [1], "INT64")
    x.set_data_from_numpy(np.array([5], np.int64))
    assert client.infer("by_service", [x]).as_numpy("Y").item() == pytest.approx(expected(5))  # type: ignore[attr-defined]


def test_an_unknown_entity_fails_its_own_request_only(client: object) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("scored", [users(3, 999)])  # type: ignore[attr-defined]
    assert "INVALID_ARGUMENT" in str(info.value.status())
    assert "user_id=999" in info.value.message()
    # Requests that share a batch with the bad one are still answered.
    calls = [(u,) for u in range(1, 8)] + [(998,)]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(client.infer, "scored", [users(*ids)]) for ids in calls]  # type: ignore[attr-defined]
    for ids, future in zip(calls, futures, strict=True):
        if ids == (998,):
            with pytest.raises(InferenceServerException, match="user_id=998"):
                future.result()
        else:
            assert future.result().as_numpy("Y").item() == pytest.approx(expected(ids[0]))


def test_missing_features_by_policy(client: object) -> None:
    got = client.infer("with_default", [users(2, 999)]).as_numpy("Y").reshape(-1)  # type: ignore[attr-defined]
    assert got.tolist() == pytest.approx([expected(2), -1 * (1 + 10 + 100)])
    got = client.infer("with_nan", [users(999, 4)]).as_numpy("Y").reshape(-1)  # type: ignore[attr-defined]
    assert np.isnan(got[0]) and got[1] == pytest.approx(expected(4))


def test_metadata_shows_the_entity_input_not_the_filled_one(client: object) -> None:
    meta = client.get_model_metadata("scored", as_json=True)  # type: ignore[attr-defined]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("USER", "INT64", ["-1", "1"])
    ]
    with pytest.raises(InferenceServerException, match="F"):
        f = grpcclient.InferInput("F", [1, 3], "FP32")
        f.set_data_from_numpy(np.zeros((1, 3), np.float32))
        client.infer("scored", [f])  # type: ignore[attr-defined]


def test_a_missing_or_broken_repository_fails_the_load_naming_the_parameter(
    client: object,
) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}  # type: ignore[attr-defined]
    assert index["no_repo"]["state"] == "UNAVAILABLE"
    assert "parameters.feast_repo" in index["no_repo"]["reason"]
    assert "parameters.feast_features" in index["bad_view"]["reason"]
    assert "'nope:age'" in index["bad_view"]["reason"]
    assert client.is_model_ready("scored")  # type: ignore[attr-defined]


def test_an_ensemble_step_looks_features_up(client: object) -> None:
    result = client.infer("pipeline", [users(4, 9, name="USER_ID")])  # type: ignore[attr-defined]
    assert result.as_numpy("SCORE").reshape(-1).tolist() == pytest.approx(
        [expected(4), expected(9)]
    )


def test_metrics(served: tuple[ServerProcess, Path], client: object) -> None:
    client.infer("with_default", [users(1, 999)])  # type: ignore[attr-defined]
    port = served[0].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines['convoy_feature_lookup_seconds_count{model="with_default"}'] >= 1
    assert lines['convoy_feature_missing_total{feature="age",model="with_default"}'] >= 1
    # The served values are an hour old: every observation is in the 1 h .. 4 h bucket.
    count = lines['convoy_feature_staleness_seconds_count{feature="clicks",model="with_default"}']
    assert count >= 1
    assert (
        lines[
            'convoy_feature_staleness_seconds_bucket{feature="clicks",le="3600.0",model="with_default"}'
        ]
        == 0
    )
    assert (
        lines[
            'convoy_feature_staleness_seconds_bucket{feature="clicks",le="14400.0",model="with_default"}'
        ]
        == count
    )


def test_captured_rows_hold_the_served_features_and_their_timestamps(
    served: tuple[ServerProcess, Path], client: object, feature_repo: FeatureRepo
) -> None:
    client.infer("scored", [users(11, 12)], request_id="captured")  # type: ignore[attr-defined]
    server, capture = served
    assert server.stop() == 0, server.output()
    glob = capture / "requests" / "model=scored" / "**" / "*.parquet"
    row = (
        duckdb.connect()
        .execute(
            "SELECT inputs.USER, inputs.age, inputs.score, inputs.clicks, inputs.age__ts, "
            f"inputs.clicks__ts FROM read_parquet('{glob}', hive_partitioning = true) "
            "WHERE request_id = 'captured'"
        )
        .fetchone()
    )
    assert row is not None
    assert [x[0] for x in row[0]] == [11, 12]
    assert [x[0] for x in row[1]] == pytest.approx([age(11, 1), age(12, 1)])
    assert [x[0] for x in row[2]] == pytest.approx([score(11, 1), score(12, 1)])
    assert [x[0] for x in row[3]] == [clicks(11, 1), clicks(12, 1)]
    hour_ago_us = int((feature_repo.now.timestamp() - 3600) * 1e6)
    assert [x[0] for x in row[4]] == [hour_ago_us, hour_ago_us]
    assert [x[0] for x in row[5]] == [hour_ago_us, hour_ago_us]
    assert FEATURES.count(":") == 3
