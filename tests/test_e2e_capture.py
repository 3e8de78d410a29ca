"""Capture end to end: the real server with --capture-dir, requests through gRPC and
HTTP/REST (stock tritonclient), a refused request and a shadow rollout; after SIGTERM every
answered request is a row of a complete Parquet file, read with DuckDB as a user would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from convoy.pb import convoy_admin_pb2 as admin
from convoy.pb import convoy_admin_pb2_grpc as admin_grpc

from .conftest import ROOT, start_server
from .linear import infer_x, linear_source, write_linear_model

pytestmark = pytest.mark.e2e
duckdb = pytest.importorskip("duckdb", reason="duckdb missing: a test extra")


def repository(root: Path) -> Path:
    """lin: version 1 (y = 2x) serves, version 2 (y = 3x) is there for a shadow rollout."""
    return write_linear_model(
        root, "lin", {1: linear_source(2), 2: linear_source(3)},
        parameters={"capture_sample_rate": "1"},
    )  # fmt: skip


def test_every_answered_request_is_a_row_after_sigterm(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    server = start_server(
        repository(tmp_path / "repo"), "--capture-dir", str(capture), "--capture-flush-secs", "1"
    )
    try:
        grpc_client = grpcclient.InferenceServerClient(server.url)
        http_client = httpclient.InferenceServerClient(server.http_url)
        for i in range(20):
            infer_x(grpc_client, "lin", float(i), f"g{i}")
        for i in range(5):
            h = httpclient.InferInput("X", [2, 1], "FP32")
            h.set_data_from_numpy(np.full((2, 1), float(i), np.float32))
            http_client.infer("lin", [h], request_id=f"h{i}")
        bad = grpcclient.InferInput("X", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        with pytest.raises(InferenceServerException):
            grpc_client.infer("lin", [bad], request_id="bad")
        # A shadow rollout: the candidate's answers are captured too, as the arm `shadow`.
        with grpc.insecure_channel(server.url) as channel:
            rollouts = admin_grpc.RolloutServiceStub(channel)
            spec = admin.RolloutSpec(strategy="shadow", step_interval_s=600, shadow_fraction=1)
            rollouts.Start(admin.StartRolloutRequest(model="lin", version="2", spec=spec))
            for i in range(5):
                infer_x(grpc_client, "lin", 100.0 + i, f"s{i}")
            time.sleep(1.0)  # mirrored runs queue behind callers
        grpc_client.close()
    finally:
        assert server.stop() == 0, server.output()
    leftovers = [p for p in capture.rglob("*.tmp")]
    assert leftovers == []  # only complete files are ever visible
    glob = capture / "requests" / "**" / "*.parquet"
    db = duckdb.connect()
    rows = db.execute(
        f"SELECT request_id, version, arm, transport, status, outputs.Y, inputs.X, total_us "
        f"FROM read_parquet('{glob}', hive_partitioning = true, hive_types_autocast = false)"
    ).fetchall()
    by_id: dict[tuple[str, str], tuple[object, ...]] = {(r[0], r[2]): r for r in rows}
    callers = [r for r in rows if r[2] != "shadow"]
    assert len(callers) == 20 + 5 + 1 + 5  # every answered request, exactly once
    g3 = by_id[("g3", "none")]
    assert g3[1:5] == ("1", "none", "grpc", "OK") and g3[5] == [[6.0]] and g3[6] == [[3.0]]
    h1 = by_id[("h1", "none")]
    assert h1[3] == "http" and h1[5] == [[2.0], [2.0]]
    refused = by_id[("bad", "none")]
    assert refused[4] == "INVALID_ARGUMENT" and refused[5] is None
    assert all(r[7] is not None and r[7] >= 0 for r in callers if r[4] == "OK")
    for i in range(5):
        stable, shadow = by_id[(f"s{i}", "stable")], by_id[(f"s{i}", "shadow")]
        assert stable[1] == "1" and stable[5] == [[2.0 * (100 + i)]]
        assert shadow[1] == "2" and shadow[5] == [[3.0 * (100 + i)]]
    metrics = server.output()
    assert "convoy stopped" in metrics


def test_an_unwritable_capture_dir_stops_start_up_naming_the_flag(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    done = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "serve", "--grpc-port", "0", "--http-port", "-1",
         "--metrics-port", "0", "--model-repository", str(repository(tmp_path / "repo")),
         "--capture-dir", str(tmp_path / "file" / "capture")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--capture-dir" in done.stderr


def test_after_kill_9_every_visible_file_is_complete(tmp_path: Path) -> None:
    """SIGKILL loses at most what was buffered; what a reader sees is whole Parquet."""
    capture = tmp_path / "capture"
    server = start_server(
        repository(tmp_path / "repo"), "--capture-dir", str(capture), "--capture-flush-secs", "0.5"
    )
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(10):
        infer_x(client, "lin", float(i), f"k{i}")
    client.close()
    time.sleep(2.0)  # a flush or more has passed
    server.stop(signal.SIGKILL)
    db = duckdb.connect()
    glob = capture / "requests" / "**" / "*.parquet"
    ids = {r[0] for r in db.execute(f"SELECT request_id FROM '{glob}'").fetchall()}
    assert ids == {f"k{i}" for i in range(10)}  # flushed before the kill: all there


def test_capture_to_an_object_store(tmp_path: Path, s3_query: str) -> None:
    """--capture-dir as an S3 URI (moto's S3-compatible server on loopback): the files
    land as objects, read back with pyarrow over the same URI."""
    import pyarrow.dataset as ds

    from convoy.capture.writer import open_filesystem

    uri = f"s3://data/serving{s3_query}"
    server = start_server(repository(tmp_path / "repo"), "--capture-dir", uri)
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(5):
        infer_x(client, "lin", float(i), f"o{i}")
    client.close()
    assert server.stop() == 0, server.output()
    filesystem, base = open_filesystem(uri)
    files = ds.dataset(f"{base}/requests", filesystem=filesystem, partitioning="hive")
    ids = sorted(files.to_table(columns=["request_id"]).column(0).to_pylist())
    assert ids == [f"o{i}" for i in range(5)]
