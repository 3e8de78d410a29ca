"""End to end: the real server in a subprocess, the stock tritonclient."""

from __future__ import annotations

import queue
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from convoy.scheduling.devices import cuda_device_count

from .conftest import ServerProcess

pytestmark = pytest.mark.e2e


def tiny_input(rows: int, start: float = 0.0) -> grpcclient.InferInput:
    data = (np.arange(rows * 16, dtype=np.float32) + start).reshape(rows, 16)
    tensor = grpcclient.InferInput("INPUT0", [rows, 16], "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def test_server_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "convoy"
    assert "model_repository" in meta["extensions"]
    index = client.get_model_repository_index(as_json=True)
    names = {m["name"]: m["state"] for m in index["models"]}
    assert names == {"image_classifier": "READY", "minilm_embedding": "READY", "tiny": "READY"}


def test_model_metadata_and_config(client: grpcclient.InferenceServerClient) -> None:
    for model in ("tiny", "image_classifier", "minilm_embedding"):
        assert client.is_model_ready(model)
    meta = client.get_model_metadata("image_classifier", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "INPUT", "datatype": "FP32", "shape": ["-1", "3", "64", "64"]}
    ]
    assert meta["outputs"] == [{"name": "LOGITS", "datatype": "FP32", "shape": ["-1", "1000"]}]
    config = client.get_model_config("minilm_embedding", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_STRING"
    assert config["output"][0]["dims"] == ["384"]
    assert "dynamic_batching" in config
    # KIND_AUTO is shown resolved, as Triton shows it.
    expected = "KIND_GPU" if cuda_device_count() else "KIND_CPU"
    assert config["instance_group"][0]["kind"] == expected
    assert config["instance_group"][0]["count"] == 1


def test_infer_sync_matches_model(client: grpcclient.InferenceServerClient) -> None:
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0")]
    result = client.infer("tiny", [tiny_input(3, start=5)], outputs=outputs, request_id="r1")
    expected = (np.arange(48, dtype=np.float32) + 5).reshape(3, 16) * 2 + 1
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    response = result.get_response()
    assert response.id == "r1"
    assert response.model_version == "1"


def test_infer_async(client: grpcclient.InferenceServerClient) -> None:
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    for i in range(8):
        client.async_infer(
            "tiny",
            [tiny_input(1, start=i)],
            callback=lambda result, error: results.put((result, error)),
        )
    seen = set()
    for _ in range(8):
        result, error = results.get(timeout=30)
        assert error is None
        out = result.as_numpy("OUTPUT0")  # type: ignore[attr-defined]
        seen.add(float((out[0, 0] - 1) / 2))
    assert seen == {float(i) for i in range(8)}


def test_stream_infer_with_error_in_the_middle(server: ServerProcess) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(5):
            client.async_stream_infer("tiny", [tiny_input(2, start=i)], request_id=f"s{i}")
        bad = grpcclient.InferInput("INPUT0", [1, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 8), np.float32))
        client.async_stream_infer("tiny", [bad], request_id="bad")
        client.async_stream_infer("tiny", [tiny_input(1, start=100)], request_id="after")
        ok, errors = {}, []
        for _ in range(7):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(str(error))
            else:
                response = result.get_response()  # type: ignore[attr-defined]
                ok[response.id] = result.as_numpy("OUTPUT0")  # type: ignore[attr-defined]
    finally:
        client.stop_stream()
        client.close()
    assert set(ok) == {"s0", "s1", "s2", "s3", "s4", "after"}
    np.testing.assert_array_equal(ok["after"][0, :2], [201.0, 203.0])
    assert len(errors) == 1 and "INPUT0" in errors[0] and "shape" in errors[0]


def test_classifier_batch(client: grpcclient.InferenceServerClient) -> None:
    images = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    batched = client.infer("image_classifier", [tensor]).as_numpy("LOGITS")
    assert batched.shape == (4, 1000)
    # Each row must equal the row computed alone: batching never mixes requests.
    single = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
    single.set_data_from_numpy(images[2:3])
    alone = client.infer("image_classifier", [single]).as_numpy("LOGITS")
    np.testing.assert_allclose(batched[2:3], alone, rtol=1e-4, atol=1e-4)


def test_embeddings_match_reference(client: grpcclient.InferenceServerClient) -> None:
    from sentence_transformers import SentenceTransformer

    from convoy.repository.examples import minilm_model_dir

    texts = [
        "Convoy batches requests under a latency budget.",
        "A cat sat on the mat.",
        "Inference servers turn models into services. " * 3,
        "",
    ]
    tensor = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    served = client.infer("minilm_embedding", [tensor]).as_numpy("EMBEDDING")
    reference = SentenceTransformer(str(minilm_model_dir()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    assert served.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(served, reference, atol=2e-5)


def test_concurrent_requests_form_batches(server: ServerProcess) -> None:
    """32 concurrent callers: each gets its own answer, and the server batches them."""

    def call(i: int) -> tuple[int, np.ndarray]:
        c = grpcclient.InferenceServerClient(server.url)
        try:
            data = np.full((1, 3, 64, 64), i / 100, dtype=np.float32)
            tensor = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
            tensor.set_data_from_numpy(data)
            return i, c.infer("image_classifier", [tensor]).as_numpy("LOGITS")
        finally:
            c.close()

    with ThreadPoolExecutor(32) as pool:
        results = dict(pool.map(call, range(64)))
    assert len(results) == 64
    # Identical inputs give identical rows; different inputs differ.
    assert not np.allclose(results[1], results[50])
    client = grpcclient.InferenceServerClient(server.url)
    stats = client.get_inference_statistics("image_classifier", as_json=True)["model_stats"][0]
    client.close()
    sizes = [int(b["batch_size"]) for b in stats["batch_stats"]]
    assert max(sizes) > 1, f"no batch larger than 1 formed: {sizes}"
    assert int(stats["inference_count"]) >= 64
    assert int(stats["execution_count"]) < int(stats["inference_count"])


def test_statistics_count_requests(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    client.infer("tiny", [tiny_input(5)])
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 5
    success_before = int(before["inference_stats"]["success"].get("count", 0))
    assert int(after["inference_stats"]["success"]["count"]) == success_before + 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(after["inference_stats"][phase]["ns"]) > 0
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in everything} == {"tiny", "image_classifier", "minilm_embedding"}


def test_grpc_health_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        named = stub.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10
        )
        assert named.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in response.list_services_response.service}
    assert "inference.GRPCInferenceService" in names


def test_prometheus_metrics(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    client.infer("tiny", [tiny_input(2)])
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [grpcclient.InferInput("NOPE", [1, 16], "FP32")])
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    labels = 'model="tiny",version="1"'
    for name in (
        "convoy_request_success_total",
        "convoy_batch_size_bucket",
        "convoy_queue_seconds_bucket",
        "convoy_compute_seconds_bucket",
        "convoy_request_seconds_bucket",
        "convoy_queue_depth",
        "convoy_inflight_requests",
    ):
        assert any(line.startswith(name) and labels in line for line in body.splitlines()), name
    assert 'convoy_request_failure_total{model="tiny",reason="InvalidInput",version="1"}' in body


def test_unimplemented_rpcs_say_so(client: grpcclient.InferenceServerClient) -> None:
    # LogSettings: the CUDA shared-memory RPCs answer where cuda-python is installed.
    with pytest.raises(InferenceServerException) as info:
        client.get_log_settings()
    assert "UNIMPLEMENTED" in str(info.value.status())


def test_classification_extension(client: grpcclient.InferenceServerClient) -> None:
    images = np.random.default_rng(3).random((2, 3, 64, 64), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    logits = client.infer("image_classifier", [tensor]).as_numpy("LOGITS")
    top = client.infer(
        "image_classifier",
        [tensor],
        outputs=[grpcclient.InferRequestedOutput("LOGITS", class_count=3)],
    ).as_numpy("LOGITS")
    assert top.shape == (2, 3)
    for row in range(2):
        entries = [item.decode().split(":") for item in top[row]]
        indices = [int(index) for _, index in entries]
        values = [float(value) for value, _ in entries]
        assert indices == list(np.argsort(-logits[row])[:3])
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, logits[row][indices], atol=1e-6)  # "%f" text
