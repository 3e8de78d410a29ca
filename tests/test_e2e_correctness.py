"""Issue 10: defects found by reading the serving path, each reproduced from outside
through the stock tritonclient (its own protobufs and stubs where tritonclient's
high-level API cannot send the malformed thing)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

SLOW_LOAD = """
import time


class Model:
    def __init__(self, config):
        time.sleep(float(config.get("load_sleep_s", "0")))

    def __call__(self, inputs):
        return {"Y": inputs["X"] * 2}
"""

OPTIONAL = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        a = inputs.get("A")
        b = inputs.get("B")
        rows = (a if a is not None else b).shape[0]
        y = np.zeros((rows, 2), np.float32)
        if a is not None:
            y += a
        if b is not None:
            y += 10 * b
        return {"Y": y}
"""

BIG = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        return {"Y": np.repeat(x, 65536, axis=1)}
"""

SLEEPY = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        time.sleep(float(inputs["X"].max()))
        return {"Y": inputs["X"].copy()}
"""

TEXT = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {"N": np.array([len(inputs["T"])], np.int64)}
"""


def _model(repo: Path, name: str, source: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "convoy_python"\n{config}')


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Path:
    root = make_repository(tmp_path_factory.mktemp("correctness"), examples_dir, ("tiny",))
    xy = """
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""
    _model(
        root,
        "slow_load",
        SLOW_LOAD,
        "max_batch_size: 8\n"
        + xy
        + 'parameters { key: "load_sleep_s" value { string_value: "2" } }',
    )
    _model(
        root,
        "optional",
        OPTIONAL,
        """max_batch_size: 16
input [ { name: "A" data_type: TYPE_FP32 dims: [ 2 ] optional: true },
        { name: "B" data_type: TYPE_FP32 dims: [ 2 ] optional: true } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200000 }
""",
    )
    _model(
        root,
        "big",
        BIG,
        """max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 65536 ] } ]
""",
    )
    _model(root, "sleepy", SLEEPY, "max_batch_size: 1\n" + xy)
    _model(
        root,
        "text",
        TEXT,
        """max_batch_size: 0
input [ { name: "T" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "N" data_type: TYPE_INT64 dims: [ 1 ] } ]
""",
    )
    return root


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(repo)
    yield proc
    proc.stop()


def _metrics(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _sample(text: str, name: str, model: str) -> float | None:
    prefix = f'{name}{{model="{model}",version="1"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def _vm(server: ServerProcess, key: str) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith(key)).split()[1]) * 1024


def _x(value: float, name: str = "X") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return tensor


def test_reload_keeps_the_models_metrics_on(served: ServerProcess) -> None:
    """Item 1: a reload must not switch convoy_model_ready off or drop the gauges."""
    client = grpcclient.InferenceServerClient(served.url)
    before = _metrics(served)
    assert _sample(before, "convoy_model_ready", "tiny") == 1.0
    client.load_model("tiny")  # a reload of a loaded model
    after = _metrics(served)
    assert _sample(after, "convoy_model_ready", "tiny") == 1.0
    assert _sample(after, "convoy_queue_depth", "tiny") == 0.0
    assert _sample(after, "convoy_inflight_requests", "tiny") == 0.0
    client.unload_model("tiny")
    assert _sample(_metrics(served), "convoy_model_ready", "tiny") == 0.0
    client.load_model("tiny")
    assert _sample(_metrics(served), "convoy_model_ready", "tiny") == 1.0
    client.close()


def test_bytes_shape_cannot_make_the_server_allocate(served: ServerProcess) -> None:
    """Item 2: 268,435,455 declared BYTES elements in a 5-byte payload are refused
    before anything is allocated: peak RSS stays where it was."""
    channel = grpc.insecure_channel(served.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    peak_before = _vm(served, "VmHWM:")
    for _ in range(3):
        request = service_pb2.ModelInferRequest(model_name="text")
        request.inputs.add(name="T", datatype="BYTES", shape=[268_435_455])
        request.raw_input_contents.append(b"\x01\x00\x00\x00a")
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'T'" in (info.value.details() or "")
    assert _vm(served, "VmHWM:") - peak_before < 100 * 2**20
    channel.close()


def test_bad_text_fails_only_its_own_request(tmp_path: Path, examples_dir: Path) -> None:
    """Item 3: one non-UTF-8 request among eight batched ones fails alone."""
    repo = make_repository(tmp_path / "repo", examples_dir, ("minilm_embedding",))
    config = repo / "minilm_embedding" / "config.pbtxt"
    # A long queue delay so that the eight concurrent requests share a batch.
    config.write_text(config.read_text().replace("2000 }", "300000 }"))
    server = start_server(repo)
    try:

        def embed(text: bytes) -> object:
            client = grpcclient.InferenceServerClient(server.url)
            tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[text]], dtype=object))
            try:
                return client.infer("minilm_embedding", [tensor]).as_numpy("EMBEDDING")
            except InferenceServerException as exc:
                return exc
            finally:
                client.close()

        texts = [b"good text %d" % i for i in range(7)]
        texts.insert(3, b"\xff\xfe\xfa")
        with ThreadPoolExecutor(len(texts)) as pool:
            outcomes = list(pool.map(embed, texts))
        bad = outcomes.pop(3)
        assert isinstance(bad, InferenceServerException)
        assert bad.status() == "StatusCode.INVALID_ARGUMENT"
        assert "input 'TEXT'" in bad.message() and "UTF-8" in bad.message()
        for outcome in outcomes:
            assert isinstance(outcome, np.ndarray) and outcome.shape == (1, 384), outcome
        stats = grpcclient.InferenceServerClient(server.url)
        batches = stats.get_inference_statistics("minilm_embedding", as_json=True)
        assert int(batches["model_stats"][0]["execution_count"]) < 7  # they did batch
        stats.close()
    finally:
        server.stop()


def test_requests_with_different_optional_inputs_do_not_share_a_batch(
    served: ServerProcess,
) -> None:
    """Item 4: A-only and B-only requests have the same shapes; batching them
    together used to fail all of them when the inputs were gathered."""

    def call(i: int) -> object:
        client = grpcclient.InferenceServerClient(served.url)
        name = "A" if i % 2 else "B"
        tensor = grpcclient.InferInput(name, [1, 2], "FP32")
        tensor.set_data_from_numpy(np.full((1, 2), i, np.float32))
        try:
            return float(client.infer("optional", [tensor]).as_numpy("Y")[0, 0])
        except InferenceServerException as exc:
            return exc
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    assert results == [float(i if i % 2 else 10 * i) for i in range(8)]


def test_a_caller_leaving_does_not_stop_a_load(served: ServerProcess) -> None:
    """Item 5: the load goes on after the RPC's deadline, and the model serves."""
    client = grpcclient.InferenceServerClient(served.url)
    client.unload_model("slow_load")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("slow_load", client_timeout=0.5)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 30
    while not client.is_model_ready("slow_load"):
        assert time.monotonic() < deadline, client.get_model_repository_index(as_json=True)
        time.sleep(0.2)
    assert client.infer("slow_load", [_x(3.0)]).as_numpy("Y")[0, 0] == 6.0
    client.close()


def test_a_stream_that_never_reads_is_bounded(served: ServerProcess) -> None:
    """Item 7: a client that writes and never reads stops being read; the server
    does not run its requests and keep their 256 KB answers without bound."""
    channel = grpc.insecure_channel(served.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    sent = threading.Event()

    def requests() -> Iterator[service_pb2.ModelInferRequest]:
        for i in range(2000):
            request = service_pb2.ModelInferRequest(model_name="big", id=str(i))
            request.inputs.add(name="X", datatype="FP32", shape=[1, 1])
            request.raw_input_contents.append(np.float32(i).tobytes())
            yield request
        sent.set()

    rss_before = _vm(served, "VmRSS:")
    call = stub.ModelStreamInfer(requests(), timeout=60)
    time.sleep(3)  # the server is held by the unread answers; never read here
    stats = grpcclient.InferenceServerClient(served.url)
    executed = int(
        stats.get_inference_statistics("big", as_json=True)["model_stats"][0].get(
            "inference_count", 0
        )
    )
    assert executed < 1000, executed  # bounded by the stream window, not the 2000 sent
    assert _vm(served, "VmRSS:") - rss_before < 300 * 2**20
    call.cancel()
    assert stats.infer("tiny", [_tiny()]).as_numpy("OUTPUT0") is not None  # still serving
    stats.close()
    channel.close()


def test_a_stream_whose_reader_fails_does_not_end_ok(served: ServerProcess) -> None:
    """Item 7: a message the server cannot read ends the stream with an error status,
    after the answer to what was read before it."""
    channel = grpc.insecure_channel(served.url)
    method = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda raw: raw,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    good = service_pb2.ModelInferRequest(model_name="slow_load", id="good")
    good.inputs.add(name="X", datatype="FP32", shape=[1, 1])
    good.raw_input_contents.append(np.float32(2).tobytes())
    messages = [good.SerializeToString(), b"\xff\xff\xff\xff not a protobuf"]
    answers: list[service_pb2.ModelStreamInferResponse] = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in method(iter(messages), timeout=30):
            answers.append(answer)
    assert info.value.code() != grpc.StatusCode.OK
    assert [a.infer_response.id for a in answers] == ["good"]
    channel.close()


def test_a_deadline_in_a_busy_queue_is_answered_on_time(served: ServerProcess) -> None:
    """Item 8: with the only instance busy for 1.5 s, a request whose 200 ms timeout
    passes in the queue is answered DEADLINE_EXCEEDED then, not when a batch forms."""
    finished: dict[str, float] = {}

    def busy() -> None:
        client = grpcclient.InferenceServerClient(served.url)
        client.infer("sleepy", [_x(1.5)])
        finished["busy"] = time.monotonic()
        client.close()

    thread = threading.Thread(target=busy)
    thread.start()
    time.sleep(0.3)  # the 1.5 s batch is running
    client = grpcclient.InferenceServerClient(served.url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("sleepy", [_x(0.0)], timeout=200_000)  # Triton's timeout, in µs
    answered = time.monotonic()
    thread.join()
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert answered < finished["busy"]  # answered while the instance was still busy
    client.close()


def _tiny() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    return tensor
