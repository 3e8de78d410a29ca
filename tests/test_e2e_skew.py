"""`convoy skew` finds planted bugs and only them. A real server captures what a model was
served from Feast's SQLite online store; skew compares it with Feast's offline store.
First the setup is correct: no mismatch. Then two bugs are planted: `score` is written
online through a transformation that differs from the offline one for users 1-5, and
`clicks` gains offline rows that are never materialised, so what is served goes stale.
The report names exactly those two features with their rates."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient

from convoy.cli import main

from .conftest import ServerProcess, start_server
from .feast_repo import USERS, FeatureRepo, build_feature_repo, score, write_feature_model

pytestmark = pytest.mark.e2e
pytest.importorskip("feast", reason="feast missing: the `feast` extra (pulled by `test`)")
duckdb = pytest.importorskip("duckdb", reason="duckdb missing: a test extra")

WRONG = range(1, 6)  # the users whose online score went through the wrong transformation


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, FeatureRepo, Path, Path]]:
    root = tmp_path_factory.mktemp("skew")
    repo = build_feature_repo(root / "feast")
    models = root / "models"
    write_feature_model(models, "skewed", repo.root, parameters={"capture_sample_rate": "1"})
    capture = root / "capture"
    server = start_server(models, "--capture-dir", str(capture), "--capture-flush-secs", "0.2")
    yield server, repo, models, capture
    server.stop()


def serve_every_user(server: ServerProcess, capture: Path, already: int) -> int:
    """Every user once, two per request; waits until the capture holds the new rows."""
    client = grpcclient.InferenceServerClient(server.url)
    for first in range(1, USERS + 1, 2):
        x = grpcclient.InferInput("USER", [2, 1], "INT64")
        x.set_data_from_numpy(np.array([[first], [first + 1]], np.int64))
        client.infer("skewed", [x])
    client.close()
    total = already + USERS // 2
    glob = capture / "requests" / "**" / "*.parquet"
    for _ in range(200):
        try:
            rows = (
                duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()
            )
        except duckdb.IOException:
            rows = (0,)
        if rows is not None and rows[0] >= total:
            return total
        time.sleep(0.1)
    raise AssertionError("the captured rows did not appear")


def skew(models: Path, capture: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "skew.json"
    words = ["--capture-dir", str(capture), "--model-repository", str(models)]
    words += ["--report", str(report), "--html", str(tmp_path / "skew.html"), *extra]
    code = main(["skew", "skewed", *words])
    return code, json.loads(report.read_text())


def test_a_correct_setup_reports_no_mismatch_then_the_planted_bugs_and_only_them(
    served: tuple[ServerProcess, FeatureRepo, Path, Path], tmp_path: Path
) -> None:
    server, repo, models, capture = served
    done = serve_every_user(server, capture, 0)
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
    serve_every_user(server, capture, done)

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
    served: tuple[ServerProcess, FeatureRepo, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, models, capture = served
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
