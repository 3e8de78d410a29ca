"""Queue policies end to end: back-pressure, request timeouts, latency-SLO batching."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

POLICY = """
dynamic_batching {
  max_queue_delay_microseconds: 1000
  default_queue_policy { max_queue_size: 2 }
}
"""
SLO = """
dynamic_batching { max_queue_delay_microseconds: 4000 }
parameters { key: "latency_slo_p99_ms" value { string_value: "50" } }
"""


@pytest.fixture(scope="module")
def policy_server(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repo = make_repository(
        tmp_path_factory.mktemp("policy"), examples_dir, ("image_classifier", "tiny")
    )
    config = repo / "image_classifier" / "config.pbtxt"
    text = config.read_text().replace(
        "dynamic_batching { max_queue_delay_microseconds: 2000 }", POLICY
    )
    config.write_text(text)
    tiny = repo / "tiny" / "config.pbtxt"
    tiny.write_text(tiny.read_text().replace("dynamic_batching { }", SLO))
    server = start_server(repo)
    yield server  # type: ignore[misc]
    server.stop()


def big_batch(client: grpcclient.InferenceServerClient, **kwargs: object) -> object:
    images = np.ones((64, 3, 64, 64), np.float32)
    tensor = grpcclient.InferInput("INPUT", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    try:
        return client.infer("image_classifier", [tensor], **kwargs)  # type: ignore[arg-type]
    except InferenceServerException as exc:
        return exc


def test_full_queue_refuses_with_resource_exhausted(policy_server: ServerProcess) -> None:
    def call(_: int) -> object:
        client = grpcclient.InferenceServerClient(policy_server.url)
        try:
            return big_batch(client)
        finally:
            client.close()

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(call, range(12)))
    errors = [o for o in outcomes if isinstance(o, InferenceServerException)]
    answers = [o for o in outcomes if not isinstance(o, InferenceServerException)]
    assert errors, "12 full batches against a queue of 2 must overflow"
    assert answers, "some requests must still be served"
    for e in errors:
        assert e.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue" in e.message() and "full" in e.message()
    assert len(errors) + len(answers) == 12


def test_request_timeout_expires_in_the_queue(policy_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(policy_server.url)
    with ThreadPoolExecutor(2) as pool:
        pool.submit(big_batch, grpcclient.InferenceServerClient(policy_server.url))
        busy = pool.submit(big_batch, grpcclient.InferenceServerClient(policy_server.url))
        # Triton's `timeout` request parameter, in microseconds: 1 ms cannot be met.
        outcome = big_batch(client, timeout=1000)
        busy.result()
    client.close()
    if isinstance(outcome, InferenceServerException):
        assert outcome.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "timed out in the queue" in outcome.message()
    else:  # it found an idle instance at once: then it ran
        assert outcome.as_numpy("LOGITS").shape == (64, 1000)  # type: ignore[attr-defined]


def test_slo_batching_exports_its_choices(policy_server: ServerProcess) -> None:
    def call(i: int) -> None:
        client = grpcclient.InferenceServerClient(policy_server.url)
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), i, np.float32))
        for _ in range(40):
            out = client.infer("tiny", [tensor]).as_numpy("OUTPUT0")
            assert out[0, 0] == 2 * i + 1
        client.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(8)))
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{policy_server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    labels = '{model="tiny",version="1"}'
    assert f"convoy_slo_target_p99_seconds{labels} 0.05" in body
    limit = [
        line for line in body.splitlines() if line.startswith(f"convoy_slo_batch_limit{labels}")
    ]
    assert limit and 1 <= float(limit[0].split()[-1]) <= 256
    p99 = [
        line
        for line in body.splitlines()
        if line.startswith(f"convoy_slo_measured_p99_seconds{labels}")
    ]
    assert p99 and float(p99[0].split()[-1]) > 0  # 320 requests: at least one window decided
