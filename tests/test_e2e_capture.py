"""Capture end to end: the real server with --capture-dir, requests through gRPC and
HTTP/REST (stock tritonclient), a refused request and a shadow rollout; after SIGTERM every
answered request is a row of a complete Parquet file, read with DuckDB as a user would."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from convoy.pb import convoy_admin_pb2 as admin
from convoy.pb import convoy_admin_pb2_grpc as admin_grpc

from .conftest import ROOT, ServerProcess, start_server
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


@pytest.mark.parametrize("where", ["under a file", "an unknown scheme"])
def test_an_unusable_capture_dir_stops_start_up_naming_the_flag(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("in the way")
    uri = str(tmp_path / "file" / "capture") if where == "under a file" else "nosuch://b/capture"
    done = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "serve", "--grpc-port", "0", "--http-port", "-1",
         "--metrics-port", "0", "--model-repository", str(repository(tmp_path / "repo")),
         "--capture-dir", uri],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"convoy serve: --capture-dir: {uri}: " in done.stderr
    assert "Traceback" not in done.stderr


def capture_metrics(server: ServerProcess) -> dict[tuple[str, tuple[str, ...]], float]:
    """The convoy_capture_* samples of a scrape, by name and label values."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(s.labels[k] for k in sorted(s.labels))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("convoy_capture_")
        for s in family.samples
    }


def wait_for(server: ServerProcess, key: tuple[str, tuple[str, ...]], value: float) -> None:
    deadline = time.monotonic() + 30
    while capture_metrics(server).get(key) != value and time.monotonic() < deadline:
        time.sleep(0.1)  # written within --capture-flush-secs
    assert capture_metrics(server).get(key) == value, capture_metrics(server)


def test_a_failing_store_drops_and_counts_rows_while_serving_goes_on(tmp_path: Path) -> None:
    """The store fails (a file where the requests' folder goes): the rows are dropped and
    counted by reason in the documented metrics, every caller is still answered, and
    once the store is back rows are written again."""
    capture = tmp_path / "capture"
    server = start_server(
        repository(tmp_path / "repo"), "--capture-dir", str(capture), "--capture-flush-secs", "0.2"
    )
    rows = ("convoy_capture_rows_total", ("lin", "1"))  # labels sorted: model, version
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for i in range(5):
            infer_x(client, "lin", float(i), f"a{i}")
        wait_for(server, rows, 5.0)
        shutil.rmtree(capture / "requests")
        (capture / "requests").write_text("in the way: every write fails")
        for i in range(4):
            assert infer_x(client, "lin", float(i), f"b{i}").as_numpy("Y")[0, 0] == 2.0 * i
        wait_for(server, ("convoy_capture_dropped_total", ("lin", "write_error", "1")), 4.0)
        (capture / "requests").unlink()
        for i in range(3):
            infer_x(client, "lin", float(i), f"c{i}")
        wait_for(server, rows, 8.0)
        client.close()
        found = capture_metrics(server)
        on_disk = list((capture / "requests").rglob("*.parquet"))
        assert found[("convoy_capture_files_total", ())] >= 1 + len(on_disk)
        assert found[("convoy_capture_bytes_total", ())] > sum(p.stat().st_size for p in on_disk)
    finally:
        assert server.stop() == 0, server.output()
    glob = capture / "requests" / "**" / "*.parquet"
    ids = {r[0] for r in duckdb.connect().execute(f"SELECT request_id FROM '{glob}'").fetchall()}
    assert ids == {"c0", "c1", "c2"}  # a0-a4 went with the folder; b0-b3 were dropped


def test_after_kill_9_every_visible_file_is_complete(tmp_path: Path) -> None:
    """SIGKILL in the middle of traffic loses at most what was buffered; what a reader
    sees is whole Parquet (test_capture.py kills a writer mid-file on purpose)."""
    import pyarrow.parquet as pq

    capture = tmp_path / "capture"
    server = start_server(
        repository(tmp_path / "repo"), "--capture-dir", str(capture), "--capture-flush-secs", "0.05"
    )
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(10):
        infer_x(client, "lin", float(i), f"k{i}")
    time.sleep(2.0)  # a flush or more has passed
    sent: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # files are being written when the kill comes
        with contextlib.suppress(InferenceServerException):
            while not stop.is_set():
                sent.append(f"t{len(sent)}")
                infer_x(client, "lin", 1.0, sent[-1])

    sender = threading.Thread(target=traffic)
    sender.start()
    time.sleep(1.5)
    server.stop(signal.SIGKILL)
    stop.set()
    sender.join(30)
    client.close()
    visible = list(capture.rglob("*.parquet"))
    ids = [i for path in visible for i in pq.read_table(path).column("request_id").to_pylist()]
    assert {f"k{i}" for i in range(10)} <= set(ids)  # flushed before the kill: all there
    assert set(ids) <= {f"k{i}" for i in range(10)} | set(sent) and len(ids) == len(set(ids))
    assert len(ids) > 10  # files of the traffic were written up to the kill


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
