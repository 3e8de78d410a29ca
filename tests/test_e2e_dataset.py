"""Labels and datasets end to end: the real server with --capture-dir, requests through
stock tritonclient, labels through the real Feedback RPC; after SIGTERM, `convoy dataset
export` in a subprocess as a user runs it, and the files read with DuckDB and pandas."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient

from convoy.pb import convoy_monitoring_pb2 as pb
from convoy.pb import convoy_monitoring_pb2_grpc as pb_grpc

from .conftest import ROOT, start_server
from .linear import infer_x, linear_source, write_linear_model

pytestmark = pytest.mark.e2e
duckdb = pytest.importorskip("duckdb", reason="duckdb missing: a test extra")
pd = pytest.importorskip("pandas", reason="pandas missing: a test extra")


def repository(root: Path) -> Path:
    """lin: captured, takes feedback; plain: takes feedback, not captured (y = 2x both)."""
    feedback = {"feedback_output": "Y"}
    write_linear_model(root, "lin", {1: linear_source(2)},
                       parameters={**feedback, "capture_sample_rate": "1"})  # fmt: skip
    return write_linear_model(root, "plain", {1: linear_source(2)}, parameters=feedback)


def scrape(port: int | None) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def export(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convoy.cli", "dataset", "export", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_labels_from_feedback_and_a_reproducible_dataset(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    server = start_server(
        repository(tmp_path / "repo"), "--capture-dir", str(capture), "--capture-flush-secs", "1"
    )
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for model, count in (("lin", 10), ("plain", 2)):
            for i in range(count):
                infer_x(client, model, float(i), f"{model}-{i}")
        client.close()
        with grpc.insecure_channel(server.url) as channel:
            feedback = pb_grpc.MonitoringServiceStub(channel).Feedback
            for i in range(4):  # the true value of lin-0 .. lin-3
                feedback(pb.FeedbackRequest(model_name="lin", id=f"lin-{i}", value=2.0 * i + 0.5))
            feedback(pb.FeedbackRequest(model_name="plain", id="plain-0", value=1.0))
            with pytest.raises(grpc.RpcError):  # refused (no such request): not captured
                feedback(pb.FeedbackRequest(model_name="lin", id="never", value=1.0))
        written = 'convoy_capture_labels_total{model="lin"} 4.0'
        deadline = time.monotonic() + 30
        while written not in scrape(server.metrics_port) and time.monotonic() < deadline:
            time.sleep(0.2)  # written within --capture-flush-secs
        assert written in scrape(server.metrics_port)
    finally:
        assert server.stop() == 0, server.output()
    assert [p.name for p in (capture / "labels").iterdir()] == ["model=lin"]
    labels = duckdb.execute(
        f"SELECT request_id, label, kind, value, version FROM read_parquet("
        f"'{capture}/labels/**/*.parquet', hive_partitioning = true) ORDER BY request_id"
    ).fetchall()
    assert labels == [(f"lin-{i}", repr(2.0 * i + 0.5), "value", 2.0 * i + 0.5, "1")
                      for i in range(4)]  # fmt: skip
    # The capture itself, unchanged, read by pandas too.
    captured = pd.read_parquet(capture / "requests")
    assert len(captured) == 10 and set(captured["model"]) == {"lin"}

    out = tmp_path / "datasets" / "lin.parquet"
    flags = ["lin", "--capture-dir", str(capture), "--with-labels", "--out", str(out)]
    first = export(*flags)
    assert first.returncode == 0, first.stderr
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["rows"] == 10 and manifest["versions"] == ["1"]
    assert manifest["label_coverage"] == pytest.approx(0.4)
    assert manifest["dataset_id"] in first.stdout
    frame = pd.read_parquet(out)
    assert list(frame["request_id"]) == [f"lin-{i}" for i in range(10)]  # answered in turn
    assert list(frame["label_value"][:4]) == [0.5, 2.5, 4.5, 6.5]
    assert frame["label"][4:].isna().all()
    rows = duckdb.execute(
        f"SELECT request_id, outputs.Y, label_value FROM read_parquet('{out}') "
        f"WHERE label IS NOT NULL ORDER BY request_id"
    ).fetchall()
    assert rows[1] == ("lin-1", [[2.0]], 2.5)  # what the model said beside the truth

    again = export(*flags)
    assert again.returncode == 0, again.stderr
    assert json.loads(Path(f"{out}.manifest.json").read_text()) == manifest  # same name
    since = frame["timestamp"][5].isoformat()  # from the sixth request on
    later = export("lin", "--capture-dir", str(capture), "--since", since, "--out", str(out))
    assert later.returncode == 0, later.stderr
    narrower = json.loads(Path(f"{out}.manifest.json").read_text())
    assert narrower["rows"] == 5 and narrower["dataset_id"] != manifest["dataset_id"]

    bad = export("lin", "--capture-dir", str(capture), "--until", "soon", "--out", str(out))
    assert bad.returncode == 2 and "--until" in bad.stderr


def test_labels_and_rows_through_front_end_processes(tmp_path: Path) -> None:
    """--frontends 2: requests answered by the front ends are captured by the engine,
    and Feedback (proxied to the engine) writes their labels, as with one process."""
    capture = tmp_path / "capture"
    server = start_server(repository(tmp_path / "repo"), "--frontends", "2",
                          "--capture-dir", str(capture), "--capture-flush-secs", "1")  # fmt: skip
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for i in range(6):
            infer_x(client, "lin", float(i), f"lin-{i}")
        client.close()
        with grpc.insecure_channel(server.url) as channel:
            feedback = pb_grpc.MonitoringServiceStub(channel).Feedback
            for i in range(3):
                feedback(pb.FeedbackRequest(model_name="lin", id=f"lin-{i}", value=i + 0.5))
    finally:
        assert server.stop() == 0, server.output()  # SIGTERM: the buffer is written
    joined = duckdb.execute(
        f"SELECT r.request_id, r.transport, r.outputs.Y, l.label, l.kind FROM read_parquet("
        f"'{capture}/requests/**/*.parquet', hive_partitioning = true) r LEFT JOIN "
        f"read_parquet('{capture}/labels/**/*.parquet', hive_partitioning = true) l "
        f"USING (request_id) ORDER BY r.request_id"
    ).fetchall()
    assert joined == [
        (f"lin-{i}", "grpc", [[2.0 * i]], repr(i + 0.5) if i < 3 else None,
         "value" if i < 3 else None)
        for i in range(6)
    ]  # fmt: skip
