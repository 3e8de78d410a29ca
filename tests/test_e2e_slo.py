"""SLOs end to end: a real server (subprocess) with slo.yaml beside its models, driven
by the stock tritonclient. Injected failures drive convoy_slo_burn_rate up and shed
background work; a canary with --max-burn-rate rolls back on it; a real Prometheus
(Debian's) evaluating the generated rules, windows scaled 1/60 so the fast-burn pair
1h/5m is 60s/5s, fires ConvoySloFastBurn, read through its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.monitoring.objectives import load_objectives
from convoy.monitoring.slo_rules import generate_rules, render_rules

from .conftest import ROOT, ServerProcess, start_server
from .linear import write_linear_model

pytestmark = pytest.mark.e2e

# Fails every request whose input is negative: failures on demand.
ON_DEMAND = """
class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        if (x < 0).any():
            raise RuntimeError("injected failure")
        return {"Y": x * 2}
"""
# A candidate that fails a quarter of its requests.
FLAKY = """
class Model:
    def __init__(self, config):
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        if self.calls % 4 == 0:
            raise RuntimeError("flaky candidate")
        return {"Y": inputs["X"] * 2}
"""
# A model whose load fails: every request is refused before a version is picked.
BROKEN = """
class Model:
    def __init__(self, config):
        raise RuntimeError("injected load failure")

    def __call__(self, inputs):
        return {"Y": inputs["X"]}
"""
SLO = """
objectives:
  - name: availability
    kind: availability
    target: 99
    window: 28d
  - name: fast
    kind: latency
    target: 99
    threshold_ms: 1000
    window: 28d
"""


def _repository(root: Path) -> Path:
    write_linear_model(root, "lin", {1: ON_DEMAND, 2: ON_DEMAND}, max_batch_size=1)
    (root / "lin" / "slo.yaml").write_text(SLO)
    write_linear_model(root, "can", {1: ON_DEMAND, 2: FLAKY}, max_batch_size=1)
    (root / "can" / "slo.yaml").write_text(SLO)
    write_linear_model(root, "plain", {1: ON_DEMAND, 2: ON_DEMAND}, max_batch_size=1)
    write_linear_model(root, "broken", {1: BROKEN}, max_batch_size=1)
    (root / "broken" / "slo.yaml").write_text(SLO)
    return root


@pytest.fixture(scope="module")
def slo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = _repository(tmp_path_factory.mktemp("slo-repo"))
    server = start_server(repo)
    yield server
    server.stop()


def _infer(client: grpcclient.InferenceServerClient, model: str, x: float,
           **kw: object) -> str:  # fmt: skip
    """'OK' or the gRPC status of the error."""
    tensor = grpcclient.InferInput("X", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), x, np.float32))
    try:
        client.infer(model, [tensor], **kw)  # type: ignore[arg-type]
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"
    return "OK"


def _metrics(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_failures_drive_the_burn_rate_up_and_shed_background_work(
    slo_server: ServerProcess,
) -> None:
    client = grpcclient.InferenceServerClient(slo_server.url)
    assert {_infer(client, "lin", 1.0) for _ in range(40)} == {"OK"}
    failures = {_infer(client, "lin", -1.0) for _ in range(10)}
    assert len(failures) == 1 and "StatusCode.INTERNAL" in failures.pop()
    bad_shape = grpcclient.InferInput("X", [1, 2], "FP32")  # the client's mistake: no event
    bad_shape.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("lin", [bad_shape])
    time.sleep(1.5)  # the server's once-a-second tick
    text = _metrics(slo_server)
    labels = {"model": "lin", "slo": "availability"}
    assert _value(text, "convoy_slo_objective", **labels) == 0.99
    assert _value(text, "convoy_slo_events_total", good="true", **labels) == 40
    assert _value(text, "convoy_slo_events_total", good="false", **labels) == 10
    burn = (10 / 50) / 0.01
    for window in ("5m", "30m", "1h", "6h"):
        assert _value(text, "convoy_slo_burn_rate", window=window, **labels) == pytest.approx(burn)
    assert _value(text, "convoy_slo_burn_rate", model="lin", slo="fast", window="5m") == 0.0
    # Fast burn (20x > 14.4x over 1h and 5m): background work is shed, callers served.
    shed = _infer(client, "lin", 1.0, parameters={"background": True})
    assert shed.startswith("StatusCode.UNAVAILABLE")
    assert "background work shed" in shed and "SLO 'availability'" in shed
    assert _infer(client, "lin", 1.0) == "OK"
    time.sleep(1.5)  # counts are exported as of the last tick
    text = _metrics(slo_server)
    assert _value(text, "convoy_slo_shed_total", model="lin", reason="fast_burn") == 1
    assert _value(text, "convoy_slo_events_total", good="true", **labels) == 41  # shed: no event
    client.close()


def test_a_model_whose_load_failed_burns_its_availability_budget(
    slo_server: ServerProcess,
) -> None:
    """Refused before a version is picked (no answer observer hears of it): still bad
    events for the model's callers, so a model that is down pages."""
    client = grpcclient.InferenceServerClient(slo_server.url)
    refusals = {_infer(client, "broken", 1.0) for _ in range(5)}
    assert len(refusals) == 1 and "StatusCode.UNAVAILABLE" in refusals.pop()
    labels = {"model": "broken", "slo": "availability"}
    deadline = time.monotonic() + 30  # exported as of the server's next tick
    while True:
        text = _metrics(slo_server)
        burn = _value(text, "convoy_slo_burn_rate", window="5m", **labels)
        if burn or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _value(text, "convoy_slo_events_total", good="false", **labels) == 5
    assert _value(text, "convoy_slo_events_total", good="true", **labels) == 0
    assert burn == pytest.approx(1.0 / 0.01)  # every event bad, over a 1% budget
    assert _value(text, "convoy_slo_burn_rate", model="broken", slo="fast", window="5m") == 0.0
    client.close()


def _rollout(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convoy.cli", "rollout", *args, "--server", server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_shadow_copies_are_shed_while_the_budget_burns_fast(slo_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(slo_server.url)
    for _ in range(10):
        _infer(client, "lin", -1.0)
    time.sleep(1.5)
    before = _value(_metrics(slo_server), "convoy_slo_shed_total", model="lin") or 0.0
    started = _rollout(slo_server, "start", "lin", "--version", "2", "--strategy", "shadow",
                       "--shadow-fraction", "1")  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        assert {_infer(client, "lin", 1.0) for _ in range(20)} == {"OK"}  # callers served
        time.sleep(1.5)
        text = _metrics(slo_server)
        shed = _value(text, "convoy_slo_shed_total", model="lin", reason="fast_burn")
        assert shed is not None and shed - before == 20  # every copy, none run on version 2
        assert _value(text, "convoy_request_success_total", model="lin", version="2") in (None, 0)
    finally:
        assert _rollout(slo_server, "rollback", "lin").returncode == 0
        client.close()


def test_a_canary_rolls_back_on_its_burn_rate(slo_server: ServerProcess) -> None:
    started = _rollout(slo_server, "start", "can", "--version", "2", "--strategy", "canary",
                       "--steps", "50,100", "--step-interval", "120s", "--min-requests", "20",
                       "--max-error-rate", "1", "--max-burn-rate", "10")  # fmt: skip
    assert started.returncode == 0, started.stderr
    stop = threading.Event()

    def load() -> None:
        client = grpcclient.InferenceServerClient(slo_server.url)
        while not stop.is_set():
            _infer(client, "can", 1.0)
        client.close()

    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 60
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            out = _rollout(slo_server, "status", "can", "--json").stdout.strip()
            status = json.loads(out.splitlines()[-1])
            if status["phase"] != "progressing":
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert status["phase"] == "rolled_back", status
    reason = str(status["reason"])
    assert "max_burn_rate 10" in reason and "SLO 'availability'" in reason
    burn = re.search(r"burn rate ([\d.]+)x", reason)
    assert burn is not None and float(burn.group(1)) > 10  # about 25x: a quarter fail


def test_the_gate_is_refused_for_a_model_without_slo(slo_server: ServerProcess) -> None:
    refused = _rollout(slo_server, "start", "plain", "--version", "2", "--strategy", "canary",
                       "--max-burn-rate", "10")  # fmt: skip
    assert refused.returncode == 1
    assert "model 'plain' declares no SLO" in refused.stderr


PROMETHEUS = shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing: apt-get install -y prometheus (CI has it)"
)
def test_real_prometheus_fires_the_fast_burn_alert(
    slo_server: ServerProcess, tmp_path: Path
) -> None:
    assert slo_server.repository is not None and PROMETHEUS is not None
    declared = load_objectives(slo_server.repository, None)
    # Windows scaled 1/60 (1h -> 60s, 5m -> 5s): `convoy slo rules` writes scale 1.
    (tmp_path / "rules.yml").write_text(render_rules(generate_rules(declared, scale=1 / 60)))
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [rules.yml]\n"
        "scrape_configs:\n"
        "  - job_name: convoy\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{slo_server.metrics_port}']}}]\n"
    )
    port = _free_port()
    data = tempfile.mkdtemp(dir=tmp_path)
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stop = threading.Event()

    def failing_load() -> None:  # a third of the requests fail: 33x a 1% budget
        client = grpcclient.InferenceServerClient(slo_server.url)
        i = 0
        while not stop.is_set():
            i += 1
            _infer(client, "lin", -1.0 if i % 3 == 0 else 1.0)
            time.sleep(0.01)
        client.close()

    worker = threading.Thread(target=failing_load, daemon=True)
    worker.start()
    firing: list[dict[str, object]] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not firing:
            time.sleep(1.0)
            try:
                url = f"http://127.0.0.1:{port}/api/v1/alerts"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    alerts = json.loads(reply.read())["data"]["alerts"]
            except OSError:
                continue  # still starting
            firing = [
                a for a in alerts
                if a["labels"].get("alertname") == "ConvoySloFastBurn" and a["state"] == "firing"
            ]  # fmt: skip
    finally:
        stop.set()
        worker.join(30)
        prometheus.terminate()
        _, err = prometheus.communicate(timeout=30)
    assert firing, f"no ConvoySloFastBurn alert fired; prometheus said:\n{err[-3000:]}"
    labels = firing[0]["labels"]
    assert isinstance(labels, dict)
    assert (labels["model"], labels["slo"], labels["severity"]) == ("lin", "availability", "page")
    assert "runbook_url" in firing[0]["annotations"]  # type: ignore[operator]


def test_a_wrong_slo_field_stops_the_server_naming_file_and_field(tmp_path: Path) -> None:
    write_linear_model(tmp_path, "lin", {1: ON_DEMAND})
    (tmp_path / "lin" / "slo.yaml").write_text(
        "objectives:\n  - {name: fast, kind: latency, target: 99}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "serve", "--model-repository", str(tmp_path),
         "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'lin' / 'slo.yaml'}: objectives[0].threshold_ms: missing" in result.stderr
