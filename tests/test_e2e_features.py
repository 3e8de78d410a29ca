"""Features from Feast at inference time, end to end: a real Feast repository (Parquet
offline sources, FeatureStore.apply, materialize into the SQLite online store) beside
convoy_python models whose input F is filled from it, served by the real server with
capture on, called through tritonclient."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.cli import main
from loadtests.feast_repo import (
    USERS,
    FeatureRepo,
    age,
    build_feature_repo,
    clicks,
    expected,
    score,
    write_feature_model,
)

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e
FEATURES_CAPTURED = ("age", "age__ts", "score", "score__ts", "clicks", "clicks__ts")
# Found, not imported: Feast takes seconds to import, paid by the fixtures that use it.
if importlib.util.find_spec("feast") is None:
    pytest.skip("feast missing: the `feast` extra (pulled by `test`)", allow_module_level=True)
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


@dataclass
class Served:
    server: ServerProcess
    capture: Path
    models: Path
    repo: FeatureRepo  # read by every model but `skewed`
    skew_repo: FeatureRepo  # `skewed`'s own: the skew test plants bugs in it


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("features")
    repo = build_feature_repo(root / "feast")
    skew_repo = build_feature_repo(root / "feast-skew")
    models, capture = root / "models", root / "capture"
    captured = {"capture_sample_rate": "1"}
    write_feature_model(models, "scored", repo.root, parameters=captured)
    write_feature_model(models, "skewed", skew_repo.root, parameters=captured)
    write_feature_model(
        models, "with_default", repo.root, parameters={"feast_missing": "default:-1"}
    )
    write_feature_model(models, "with_nan", repo.root, parameters={"feast_missing": "nan"})
    write_feature_model(
        models, "by_service", repo.root, max_batch_size=0,
        parameters={"feast_features": "", "feast_feature_service": "scoring", **captured},
    )  # fmt: skip
    write_feature_model(
        models, "cached", repo.root, parameters=captured, extra="response_cache { enable: true }\n"
    )
    write_feature_model(
        models, "hashed", repo.root, parameters={**captured, "capture_hash": "USER"}
    )
    write_feature_model(models, "no_repo", repo.root, parameters={"feast_repo": "elsewhere"})
    write_feature_model(
        models, "bad_view", repo.root, parameters={"feast_features": "nope:age,a:b,c:d"}
    )
    broken = root / "broken-feast"
    broken.mkdir()
    (broken / "feature_store.yaml").write_text("project: [unclosed\n")
    write_feature_model(models, "broken_repo", broken)
    (models / "pipeline" / "1").mkdir(parents=True)
    (models / "pipeline" / "config.pbtxt").write_text(ENSEMBLE)
    server = start_server(
        models, "--capture-dir", str(capture), "--capture-flush-secs", "0.2",
        "--cache-config", "local,size=16777216",
    )  # fmt: skip
    yield Served(server, capture, models, repo, skew_repo)
    server.stop()


@pytest.fixture()
def client(served: Served) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(served.server.url)
    yield c
    c.close()


def captured_rows(
    capture: Path, model: str, select: str, where: str, at_least: int
) -> list[tuple[Any, ...]]:
    """`select` of `model`'s captured rows matching `where`, once `at_least` are written."""
    glob = capture / "requests" / f"model={model}" / "**" / "*.parquet"
    query = f"SELECT {select} FROM read_parquet('{glob}', hive_partitioning = true) WHERE {where}"
    for _ in range(300):
        try:
            rows = duckdb.connect().execute(query).fetchall()
        except duckdb.IOException:  # no file yet
            rows = []
        if len(rows) >= at_least:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} captured rows of {model} where {where}")


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


def test_metadata_shows_the_entity_input_not_the_filled_one(served: Served, client: object) -> None:
    meta = client.get_model_metadata("scored", as_json=True)  # type: ignore[attr-defined]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("USER", "INT64", ["-1", "1"])
    ]
    http = urllib.request.urlopen(f"http://{served.server.http_url}/v2/models/scored", timeout=10)
    assert [i["name"] for i in json.loads(http.read())["inputs"]] == ["USER"]
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
    assert "parameters.feast_repo" in index["broken_repo"]["reason"]
    assert "broken" in index["broken_repo"]["reason"]
    assert client.is_model_ready("scored")  # type: ignore[attr-defined]


def test_an_ensemble_step_looks_features_up(client: object) -> None:
    result = client.infer("pipeline", [users(4, 9, name="USER_ID")])  # type: ignore[attr-defined]
    assert result.as_numpy("SCORE").reshape(-1).tolist() == pytest.approx(
        [expected(4), expected(9)]
    )


def test_metrics(served: Served, client: object) -> None:
    client.infer("with_default", [users(1, 999)])  # type: ignore[attr-defined]
    port = served.server.metrics_port
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
    served: Served, client: object
) -> None:
    client.infer("scored", [users(11, 12)], request_id="captured")  # type: ignore[attr-defined]
    capture, feature_repo = served.capture, served.repo
    select = (
        "inputs.USER, inputs.age, inputs.score, inputs.clicks, inputs.age__ts, inputs.clicks__ts"
    )
    (row,) = captured_rows(capture, "scored", select, "request_id = 'captured'", 1)
    assert [x[0] for x in row[0]] == [11, 12]
    assert [x[0] for x in row[1]] == pytest.approx([age(11, 1), age(12, 1)])
    assert [x[0] for x in row[2]] == pytest.approx([score(11, 1), score(12, 1)])
    assert [x[0] for x in row[3]] == [clicks(11, 1), clicks(12, 1)]
    hour_ago_us = int((feature_repo.now.timestamp() - 3600) * 1e6)
    assert [x[0] for x in row[4]] == [hour_ago_us, hour_ago_us]
    assert [x[0] for x in row[5]] == [hour_ago_us, hour_ago_us]
    # Marked as looked up: a replay sends USER and leaves the features to the lookup.
    import pyarrow.parquet as pq

    (first,) = list((capture / "requests" / "model=scored").rglob("*.parquet"))[:1]
    fields = {f.name: f for f in pq.read_schema(first).field("inputs").type}
    assert set(fields) == {"USER", *FEATURES_CAPTURED}
    assert fields["age"].metadata[b"looked_up"] == b"true"
    assert b"looked_up" not in (fields["USER"].metadata or {})


# -- convoy skew: planted bugs found, and only them --------------------------------------

WRONG = range(1, 6)  # the users whose online score went through the wrong transformation


def serve_every_user(served: Served, already: int) -> int:
    """Every user once, two per request; waits until the capture holds the new rows."""
    client = grpcclient.InferenceServerClient(served.server.url)
    for first in range(1, USERS + 1, 2):
        x = grpcclient.InferInput("USER", [2, 1], "INT64")
        x.set_data_from_numpy(np.array([[first], [first + 1]], np.int64))
        client.infer("skewed", [x])
    client.close()
    total = already + USERS // 2
    captured_rows(served.capture, "skewed", "request_id", "true", total)
    return total


def skew(models: Path, capture: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "skew.json"
    words = ["--capture-dir", str(capture), "--model-repository", str(models)]
    words += ["--report", str(report), "--html", str(tmp_path / "skew.html"), *extra]
    code = main(["skew", "skewed", *words])
    return code, json.loads(report.read_text())


def test_a_correct_setup_reports_no_mismatch_then_the_planted_bugs_and_only_them(
    served: Served, tmp_path: Path
) -> None:
    repo, models, capture = served.skew_repo, served.models, served.capture
    done = serve_every_user(served, 0)
    code, report = skew(models, capture, tmp_path)
    assert code == 0, report
    assert report["rows"] == USERS
    assert set(report["features"]) == {"age", "score", "clicks"}
    for feature in report["features"].values():
        assert feature == {"mismatch_rate": 0.0, "mean_abs_diff": 0.0, "staleness_s": 0.0,
                           "missing": 0, "rows": USERS}  # fmt: skip

    planted = dt.datetime.now(dt.UTC)
    store = repo.store()
    hour_ago = repo.now - pd.Timedelta(hours=1)
    # Bug 1: the online pipeline doubles `score` for users 1-5 (offline is right).
    wrong = pd.DataFrame(
        {
            "user_id": list(WRONG),
            "event_timestamp": [hour_ago] * len(WRONG),
            "age": np.array([u + 0.5 for u in WRONG], np.float32),
            "score": [2 * score(u, 1) for u in WRONG],
        }
    )
    store.write_to_online_store("user_stats", wrong)
    # Bug 2: `clicks` gets new offline rows ten minutes ago, never materialised.
    activity = pd.read_parquet(repo.root / "user_activity.parquet")
    fresh = pd.DataFrame(
        {
            "user_id": range(1, USERS + 1),
            "event_timestamp": [repo.now - pd.Timedelta(minutes=10)] * USERS,
            "clicks": [1000 + u for u in range(1, USERS + 1)],
        }
    )
    pd.concat([activity, fresh]).to_parquet(repo.root / "user_activity.parquet")
    serve_every_user(served, done)

    code, report = skew(models, capture, tmp_path, "--since", planted.isoformat())
    assert code == 1
    features = report["features"]
    assert report["failed"] == ["clicks", "score"]
    assert features["score"]["mismatch_rate"] == pytest.approx(len(WRONG) / USERS)
    assert features["score"]["staleness_s"] == 0.0
    assert features["clicks"]["mismatch_rate"] == 1.0
    assert features["clicks"]["staleness_s"] == pytest.approx(50 * 60)
    assert features["age"]["mismatch_rate"] == 0.0
    assert all(f["missing"] == 0 for f in features.values())
    assert "clicks" in (tmp_path / "skew.html").read_text()
    # A threshold above both rates passes.
    code, _ = skew(
        models, capture, tmp_path, "--since", planted.isoformat(), "--max-mismatch-rate", "1"
    )
    assert code == 0


def test_usage_errors_name_the_flag(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models, capture = served.models, served.capture
    assert (
        main(["skew", "nope", "--capture-dir", str(capture), "--model-repository", str(models)])
        == 2
    )
    assert "--model-repository" in capsys.readouterr().err
    code = main(
        [
            "skew",
            "skewed",
            "--capture-dir",
            str(tmp_path / "none"),
            "--model-repository",
            str(models),
        ]
    )
    assert code == 2
    assert "--capture-dir" in capsys.readouterr().err


def test_skew_of_a_model_without_batching_by_feature_service(
    served: Served, client: object, tmp_path: Path
) -> None:
    for user in (1, 2, 3):
        x = grpcclient.InferInput("USER", [1], "INT64")
        x.set_data_from_numpy(np.array([user], np.int64))
        client.infer("by_service", [x], request_id=f"svc{user}")  # type: ignore[attr-defined]
    rows = captured_rows(served.capture, "by_service", "request_id", "status = 'OK'", 3)
    report = tmp_path / "skew.json"
    words = ["--capture-dir", str(served.capture), "--model-repository", str(served.models)]
    assert main(["skew", "by_service", *words, "--report", str(report)]) == 0
    found = json.loads(report.read_text())
    assert found["rows"] == len(rows)
    assert list(found["features"]) == ["age", "score", "clicks"]
    assert all(f["mismatch_rate"] == 0 and f["missing"] == 0 for f in found["features"].values())


def test_a_response_cache_hit_is_captured_with_the_features_and_compared(
    served: Served, client: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for request_id in ("computed", "hit"):
        client.infer("cached", [users(3, 4)], request_id=request_id)  # type: ignore[attr-defined]
    stats = client.get_inference_statistics("cached", as_json=True)  # type: ignore[attr-defined]
    assert int(stats["model_stats"][0]["inference_stats"]["cache_hit"]["count"]) == 1
    rows = captured_rows(
        served.capture, "cached", "request_id, inputs.age, inputs.age__ts", "status = 'OK'", 2
    )
    assert sorted(r[0] for r in rows) == ["computed", "hit"]
    assert rows[0][1:] == rows[1][1:] and None not in rows[0][1] + rows[0][2]
    report = tmp_path / "skew.json"
    words = ["--capture-dir", str(served.capture), "--model-repository", str(served.models)]
    assert main(["skew", "cached", *words, "--report", str(report)]) == 0
    found = json.loads(report.read_text())
    assert found["rows"] == 4 and found["skipped_rows"] == 0 and found["notes"] == []
    assert all(f["mismatch_rate"] == 0 and f["missing"] == 0 for f in found["features"].values())
    # Nothing in the window: nothing to compare, a failure.
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
    assert main(["skew", "cached", *words, "--since", later]) == 1
    capsys.readouterr()


def test_skew_refuses_hashed_entity_inputs_naming_the_parameter(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    words = ["--capture-dir", str(served.capture), "--model-repository", str(served.models)]
    assert main(["skew", "hashed", *words]) == 2
    err = capsys.readouterr().err
    assert "capture_hash" in err and "USER" in err


def test_importing_feast_leaves_prometheus_clients_mode_alone() -> None:
    """Feast's import sets PROMETHEUS_MULTIPROC_DIR for its own feature server: a front end
    or server started after it ran prometheus_client in its multiprocess mode (one lock
    for every metric, in Feast's temporary directory), and a server hung at start-up."""
    import os
    import subprocess
    import sys

    from convoy.features.lookup import FEAST_SETS

    script = (
        "import os, sys\nfrom convoy.features.lookup import import_feast\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "feast = import_feast()\nassert feast.FeatureStore\n"
        "from prometheus_client.values import ValueClass\n"  # the mode it chose
        f"print(ValueClass.__name__, [name for name in {FEAST_SETS!r} if name in os.environ])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in FEAST_SETS}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "MutexValue []"
