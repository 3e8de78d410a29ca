"""Monitoring through the real server: drift injected with tritonclient shows in
/metrics, in a real Prometheus' HTTP API and in `convoy monitor`; feedback goes through
MonitoringService on the inference port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from convoy.pb import convoy_monitoring_pb2 as pb
from convoy.pb import convoy_monitoring_pb2_grpc as pb_grpc
from tests.conftest import ROOT, ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

SHIFTED_FEATURE = 5
PARAMETERS = {
    "drift_reference": "reference.npz",
    "drift_window": "100",
    "drift_interval_s": "0.2",
    "feedback_reference_accuracy": "0.9",
}


@pytest.fixture(scope="module")
def monitored(
    examples_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`tiny` (2x + 1) with a reference of standard normal inputs and their outputs."""
    repo = make_repository(tmp_path_factory.mktemp("monitored"), examples_dir, ("tiny",))
    model_dir = repo / "tiny"
    with (model_dir / "config.pbtxt").open("a") as config:
        for key, value in PARAMETERS.items():
            config.write(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n')
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    np.savez(model_dir / "reference.npz", INPUT0=x, OUTPUT0=2 * x + 1)
    proc = start_server(repo)
    yield proc
    proc.stop()


def _infer(server: ServerProcess, rows: np.ndarray, request_id: str = "") -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    data = grpcclient.InferInput("INPUT0", list(rows.shape), "FP32")
    data.set_data_from_numpy(rows)
    result = client.infer("tiny", [data], request_id=request_id)
    return np.asarray(result.as_numpy("OUTPUT0"))


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _metric(server: ServerProcess, line_start: str) -> float | None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


def _inject_drift(server: ServerProcess) -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):  # 240 rows: two windows of 100
        x = rng.standard_normal((4, 16)).astype(np.float32)
        x[:, SHIFTED_FEATURE] += 1.0
        _infer(server, x)


def test_injected_drift_shows_in_metrics_and_convoy_monitor(monitored: ServerProcess) -> None:
    _inject_drift(monitored)
    detected = 'convoy_drift_detected{input="INPUT0",model="tiny",version="1"}'
    _wait_for(lambda: _metric(monitored, detected) == 1.0, "the drift gauge")
    p_value = _metric(
        monitored,
        f'convoy_drift_p_value{{feature="{SHIFTED_FEATURE}",input="INPUT0",model="tiny",version="1"}}',
    )
    assert p_value is not None and p_value < 0.05
    result = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "monitor", "tiny", "--server", monitored.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    drifted = [line.split()[0] for line in result.stdout.splitlines() if line.endswith("DRIFT")]
    assert str(SHIFTED_FEATURE) in drifted


def test_feedback_through_the_monitoring_service(monitored: ServerProcess) -> None:
    x = np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32)
    output = _infer(monitored, x, request_id="fb-1")
    with grpc.insecure_channel(monitored.url) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        reply = stub.Feedback(
            pb.FeedbackRequest(model_name="tiny", id="fb-1", class_index=int(np.argmax(output[0])))
        )
        assert (reply.model_version, reply.correct) == ("1", True)
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(pb.FeedbackRequest(model_name="tiny", id="fb-1", class_index=0))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # judged once, then forgotten
    accuracy = 'convoy_feedback_accuracy{model="tiny",version="1"}'
    assert _metric(monitored, accuracy) == 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed (apt-get install -y prometheus)",
)
def test_a_real_prometheus_scrapes_the_drift_gauge(
    monitored: ServerProcess, tmp_path: Path
) -> None:
    _inject_drift(monitored)
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: convoy\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{monitored.metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    query = 'convoy_drift_detected{model="tiny",input="INPUT0"}'
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})

    def drift_in_prometheus() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                results = json.load(response)["data"]["result"]
        except OSError:
            return False  # not listening yet
        return any(r["value"][1] == "1" for r in results)

    try:
        _wait_for(drift_in_prometheus, "Prometheus to scrape the drift gauge", timeout=60)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def _drift_status(server: ServerProcess, version: str = "") -> pb.DriftStatusResponse:
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        reply: pb.DriftStatusResponse = stub.DriftStatus(
            pb.DriftStatusRequest(model_name="tiny", model_version=version)
        )
        return reply


def test_a_failed_reload_keeps_the_serving_versions_monitoring(
    examples_dir: Path, tmp_path: Path
) -> None:
    """A reload whose model file is broken fails after the new version's monitoring was
    set up; version 1 keeps serving, and must keep its monitor, figures and metrics."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = make_repository(tmp_path / "repo", examples_dir, ("tiny",))
    model_dir = repo / "tiny"
    with (model_dir / "config.pbtxt").open("a") as config:
        for key, value in PARAMETERS.items():
            config.write(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n')
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    np.savez(model_dir / "reference.npz", INPUT0=x, OUTPUT0=2 * x + 1)
    server = start_server(repo)
    try:
        _inject_drift(server)
        detected = 'convoy_drift_detected{input="INPUT0",model="tiny",version="1"}'
        windows = 'convoy_drift_windows_total{input="INPUT0",model="tiny",version="1"}'
        sampled = 'convoy_drift_sampled_requests_total{model="tiny",version="1"}'
        before = {"INPUT0": 2, "OUTPUT0": 2}  # 240 rows: two windows of 100 each

        def all_scored() -> bool:
            return {t.name: t.windows for t in _drift_status(server, "1").tensors} == before

        _wait_for(all_scored, "both windows of each tensor to be tested")
        assert _metric(server, detected) == 1.0
        windows_before = _metric(server, windows)
        assert windows_before == 2.0
        # Break the model file (the version directory links into the shared examples:
        # replace the link, never write through it).
        model_file = model_dir / "1" / "model.pt"
        model_file.unlink()
        model_file.write_bytes(b"not a TorchScript archive")
        client = grpcclient.InferenceServerClient(server.url)
        with pytest.raises(InferenceServerException):
            client.load_model("tiny")
        assert client.is_model_ready("tiny", "1")  # the old version still serves
        status = _drift_status(server, "1")  # not NOT_FOUND
        assert {t.name: t.windows for t in status.tensors} == before
        assert _metric(server, detected) == 1.0
        assert _metric(server, windows) == windows_before
        sampled_before = _metric(server, sampled)
        assert sampled_before is not None
        _infer(server, np.zeros((4, 16), np.float32))
        # The monitor that answers is the one the serving version feeds.
        assert _metric(server, sampled) == sampled_before + 1
        client.close()
    finally:
        server.stop()


def test_a_reload_takes_the_new_feedback_settings(examples_dir: Path, tmp_path: Path) -> None:
    """Changed feedback_* parameters take effect on reload; predictions awaiting
    feedback and the rolling figures carry over."""
    import tritonclient.grpc as grpcclient

    repo = make_repository(tmp_path / "repo", examples_dir, ("tiny",))
    config = repo / "tiny" / "config.pbtxt"
    original = config.read_text()

    def configure(**parameters: str) -> None:
        lines = [
            f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
            for key, value in parameters.items()
        ]
        config.write_text(original + "".join(lines))

    configure(feedback_reference_accuracy="0.9")
    server = start_server(repo)
    rng = np.random.default_rng(3)
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.MonitoringServiceStub(channel)

            def judge(request_id: str, correct: bool) -> pb.FeedbackResponse:
                x = rng.standard_normal((1, 16)).astype(np.float32)
                top = int(np.argmax(_infer(server, x, request_id=request_id)[0]))
                label = top if correct else (top + 1) % 16
                reply: pb.FeedbackResponse = stub.Feedback(
                    pb.FeedbackRequest(model_name="tiny", id=request_id, class_index=label)
                )
                return reply

            assert judge("first", correct=True).window == 1
            x = rng.standard_normal((1, 16)).astype(np.float32)
            top = int(np.argmax(_infer(server, x, request_id="across")[0]))
            configure(feedback_reference_accuracy="0.8", feedback_window="2")
            client = grpcclient.InferenceServerClient(server.url)
            client.load_model("tiny")
            client.close()
            reference = 'convoy_feedback_reference_accuracy{model="tiny",version="1"}'
            assert _metric(server, reference) == 0.8
            # Answered before the reload, judged after it: still kept.
            reply = stub.Feedback(
                pb.FeedbackRequest(model_name="tiny", id="across", class_index=top)
            )
            assert (reply.correct, reply.window) == (True, 2)  # the new window: 2 judgements
            reply = judge("after", correct=False)
            assert (reply.window, reply.rolling) == (2, 0.5)
            status = stub.DriftStatus(pb.DriftStatusRequest(model_name="tiny"))
            assert [(f.reference, f.window) for f in status.feedback] == [(0.8, 2)]
    finally:
        server.stop()
