"""Replay end to end: traffic captured by a real server (--capture-dir), replayed with
`convoy replay` as a CI pipeline runs it, in process and against the live server.

`lin` version 1 computes y = 2x, version 2 y = 3x, version 3 y = 2x again; `noisy`
adds small noise to y = 2x in both its versions. Every request was served by version 1.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from .conftest import ROOT, ServerProcess, start_server
from .linear import linear_source, write_linear_model

pytestmark = pytest.mark.e2e
pa = pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")

NOISY = """
import numpy as np


class Model:
    def __init__(self, config):
        self.rng = np.random.default_rng()

    def __call__(self, inputs):
        x = inputs["X"]
        return {"Y": x * 2 + self.rng.normal(0, 1e-3, x.shape).astype(x.dtype)}
"""
LIN_REQUESTS = 24
NOISY_REQUESTS = 12
LABELLED = 8


def repository(root: Path) -> Path:
    """lin: version 1 y = 2x, 2 y = 3x, 3 y = 2x again; noisy: 2x plus noise, twice."""
    capture = {"capture_sample_rate": "1"}
    lin = {v: linear_source(f) for v, f in ((1, 2), (2, 3), (3, 2))}
    write_linear_model(root, "lin", lin, parameters=capture, version_policy="all { }")
    return write_linear_model(
        root, "noisy", {1: NOISY, 2: NOISY}, parameters=capture, version_policy="all { }"
    )


@dataclass
class Captured:
    server: ServerProcess
    repository: Path
    capture: Path


def captured_ids(capture: Path, model: str) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for path in (capture / "requests" / f"model={model}").rglob("*.parquet"):
        if not path.name.startswith("."):
            ids += pq.read_table(path, columns=["request_id"]).column(0).to_pylist()
    return ids


def wait_for(capture: Path, model: str, count: int, prefix: str = "") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(i.startswith(prefix) for i in captured_ids(capture, model)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} rows of {model} were not captured in 30 s")


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captured]:
    """Traffic served by version 1, with a label for the first requests of `lin`."""
    root = tmp_path_factory.mktemp("replay")
    repo, capture = repository(root / "repo"), root / "capture"
    server = start_server(repo, "--capture-dir", str(capture), "--capture-flush-secs", "0.5")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for model, count in (("lin", LIN_REQUESTS), ("noisy", NOISY_REQUESTS)):
            for i in range(count):
                rows = 1 + i % 4  # batches of 1 to 4 rows
                x = grpcclient.InferInput("X", [rows, 1], "FP32")
                x.set_data_from_numpy(np.full((rows, 1), 0.5 + i, np.float32))
                client.infer(model, [x], model_version="1", request_id=f"{model}-{i}")
        client.close()
        wait_for(capture, "lin", LIN_REQUESTS)
        wait_for(capture, "noisy", NOISY_REQUESTS)
        # Labels arrive later, as another process writes them: the right answer, 2x.
        labels = capture / "labels" / "model=lin" / "date=2026-12-07"
        labels.mkdir(parents=True)
        now = dt.datetime.now(dt.UTC)
        table = pa.table(
            {
                "request_id": [f"lin-{i}" for i in range(LABELLED)],
                "label": [2 * (0.5 + i) for i in range(LABELLED)],
                "timestamp": pa.array([now] * LABELLED, pa.timestamp("us", tz="UTC")),
            }
        )
        import pyarrow.parquet as pq

        pq.write_table(table, labels / "labels-1.parquet")
        yield Captured(server, repo, capture)
    finally:
        assert server.stop() == 0, server.output()


def replay(captured: Captured, tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any], str]:
    report, page = tmp_path / "report.json", tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "replay", *argv,
         "--capture-dir", str(captured.capture), "--report", str(report), "--html", str(page)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    document = json.loads(report.read_text()) if report.exists() else {}
    if document:
        assert page.read_text().startswith("<!doctype html>")
    return done.returncode, document, done.stdout + done.stderr


def in_process(
    captured: Captured, tmp_path: Path, model: str, candidate: str
) -> tuple[int, dict[str, Any], str]:
    repository = str(captured.repository)
    return replay(
        captured, tmp_path, model, "--candidate", candidate, "--model-repository", repository
    )


def test_in_process_a_candidate_that_answers_differently_fails(
    captured: Captured, tmp_path: Path
) -> None:
    code, report, output = in_process(captured, tmp_path, "lin", "2")
    assert code == 1, output
    assert (report["model"], report["candidate"], report["baseline"]) == ("lin", "2", "1")
    assert report["requests"] == LIN_REQUESTS and report["errors"] == {"2": 0, "1": 0}
    assert report["diff_rate"] == 1.0 and report["noise_floor"] == 0.0
    assert report["divergence"]["Y"]["max_abs"] == pytest.approx(0.5 + LIN_REQUESTS - 1)
    assert report["accuracy"] == {"2": 0.0, "1": 1.0}
    assert set(report["latency_ms"]) == {"1", "2"} and report["latency_ms"]["2"]["p99"] > 0
    assert not report["passed"]
    assert report["reasons"][0].startswith("diff_rate 1.0000 exceeds the noise floor 0.0000")
    assert report["reasons"][1].startswith("accuracy 0.0000 is 1.0000 below")
    assert "FAILED" in output


def test_in_process_an_identical_candidate_passes_at_the_noise_floor(
    captured: Captured, tmp_path: Path
) -> None:
    code, report, output = in_process(captured, tmp_path, "lin", "3")
    assert code == 0, output
    assert report["diff_rate"] == report["noise_floor"] == 0.0
    assert report["noise_compared"] == LIN_REQUESTS
    assert report["accuracy"] == {"3": 1.0, "1": 1.0}
    assert report["passed"] and report["reasons"] == []


def test_a_nondeterministic_model_shows_its_noise_floor(captured: Captured, tmp_path: Path) -> None:
    code, report, output = in_process(captured, tmp_path, "noisy", "2")
    assert code == 0, output  # the candidate differs as much as the baseline from itself
    assert report["noise_floor"] > 0.5 and report["diff_rate"] > 0.5
    assert report["passed"]
    assert report["accuracy"] == {"2": None, "1": None}
    assert report["reasons"] == [
        "accuracy: no labels folder in the capture directory; gate skipped"
    ]


def test_against_the_live_server_in_the_background_and_not_replayed_again(
    captured: Captured, tmp_path: Path
) -> None:
    url = captured.server.url
    code, report, output = replay(
        captured, tmp_path, "lin", "--candidate", "2", "--server", url, "--rate", "500"
    )
    assert code == 1, output
    assert report["diff_rate"] == 1.0 and report["noise_floor"] == 0.0
    code, report, output = replay(
        captured, tmp_path, "lin", "--candidate", "3", "--server", url, "--rate", "500"
    )
    assert code == 0, output
    assert report["diff_rate"] == 0.0 and report["passed"]
    # The server captured the replays too, marked as such: the next replay leaves them out.
    wait_for(captured.capture, "lin", 4 * LIN_REQUESTS, prefix="replay:")
    code, report, output = in_process(captured, tmp_path, "lin", "3")
    assert code == 0, output
    assert report["requests"] == LIN_REQUESTS and report["skipped"]["replay"] == 4 * LIN_REQUESTS


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--candidate", "9", "--model-repository", "{repo}"], "--candidate"),
        (["--candidate", "2", "--baseline", "8", "--model-repository", "{repo}"], "--baseline"),
        (["--candidate", "9", "--server", "{url}"], "--candidate"),
        (["--candidate", "2", "--server", "127.0.0.1:1"], "--server"),
        (["--candidate", "2", "--since", "2000-01-01", "--until", "2000-01-02"], "--capture-dir"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(
    captured: Captured, tmp_path: Path, argv: list[str], flag: str
) -> None:
    argv = [a.format(repo=captured.repository, url=captured.server.url) for a in argv]
    code, report, output = replay(captured, tmp_path, "lin", *argv)
    assert code == 2, output
    assert flag in output and report == {}


CLASSIFIER = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = np.floor(inputs["X"][:, 0]).astype(np.int64)
        top = (x + {shift} * (x % 2)) % 3  # shift 1: every odd x's class is wrong
        scores = np.full((len(x), 3), 0.1, np.float32)
        scores[np.arange(len(x)), top] = 0.8
        return {{"SCORES": scores}}
"""
CLASSIFIER_CONFIG = """
name: "cls"
backend: "convoy_python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 3 ] } ]
version_policy: { all { } }
parameters [
  { key: "capture_sample_rate" value { string_value: "1" } },
  { key: "feedback_output" value { string_value: "SCORES" } }
]
"""


def test_a_worse_classifier_shows_its_accuracy_drop(tmp_path: Path) -> None:
    """Labels given through the Feedback RPC as class indices, captured by the server;
    the replay scores both versions' top-1 on them and the accuracy gate fails."""
    import grpc

    from convoy.pb import convoy_monitoring_pb2 as mpb
    from convoy.pb import convoy_monitoring_pb2_grpc as mpb_grpc

    repo, capture = tmp_path / "repo", tmp_path / "capture"
    for version, shift in ((1, 0), (2, 1)):
        (repo / "cls" / str(version)).mkdir(parents=True)
        (repo / "cls" / str(version) / "model.py").write_text(CLASSIFIER.format(shift=shift))
    (repo / "cls" / "config.pbtxt").write_text(CLASSIFIER_CONFIG)
    server = start_server(repo, "--capture-dir", str(capture), "--capture-flush-secs", "0.5")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for i in range(12):
            x = grpcclient.InferInput("X", [1, 1], "FP32")
            x.set_data_from_numpy(np.full((1, 1), i + 0.25, np.float32))
            client.infer("cls", [x], model_version="1", request_id=f"cls-{i}")
        client.close()
        with grpc.insecure_channel(server.url) as channel:
            feedback = mpb_grpc.MonitoringServiceStub(channel).Feedback
            for i in range(12):  # the true class: i % 3, what version 1 answers
                feedback(mpb.FeedbackRequest(model_name="cls", id=f"cls-{i}", class_index=i % 3))
    finally:
        assert server.stop() == 0, server.output()  # SIGTERM writes what is buffered
    assert list((capture / "labels" / "model=cls").rglob("*.parquet"))
    done = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "replay", "cls", "--candidate", "2",
         "--model-repository", str(repo), "--capture-dir", str(capture),
         "--max-accuracy-drop", "0.1", "--max-diff-rate", "1", "--report",
         str(tmp_path / "report.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 1, done.stdout + done.stderr
    assert report["requests"] == 12 and report["accuracy"] == {"2": 0.5, "1": 1.0}
    assert report["divergence"]["SCORES"]["top1_change"] == 0.5
    assert [r for r in report["reasons"] if r.startswith("accuracy 0.5000 is 0.5000 below")]
