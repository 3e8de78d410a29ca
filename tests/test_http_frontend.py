"""KServe v2 HTTP/REST: HttpFrontend in-process over a real ModelRepository,
driven by tritonclient.http and by raw requests for the malformed corpus."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import struct
import textwrap
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from convoy import config as config_module
from convoy.api.auth import AccessPolicy
from convoy.api.http import HttpFrontend
from convoy.inference.path import InferencePath
from convoy.metrics import Metrics
from convoy.repository.manager import ModelRepository

from .conftest import make_repository

T = TypeVar("T")

ADD_SUB_CONFIG = """
name: "add_sub"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
dynamic_batching { }
instance_group [{ kind: KIND_CPU }]
"""

ADD_SUB_MODEL = """
import json
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, "OUTPUT0")
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", (a + b).astype(self.dtype)),
                pb_utils.Tensor("OUTPUT1", (a - b).astype(self.dtype)),
            ]))
        return responses
"""

UPPER_CONFIG = """
name: "upper"
backend: "python"
max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] } ]
"""

UPPER_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            upper = np.array([t.upper() for t in text.reshape(-1)], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("UPPER", upper)]))
        return responses
"""

MAX_BODY = 1 << 20  # small, so the size limit is cheap to reach


def _python_model(root: Path, name: str, config: str, source: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(config)
    (root / name / "1" / "model.py").write_text(textwrap.dedent(source))


@dataclass
class Served:
    """A repository and two HTTP frontends on one event loop in a thread."""

    loop: asyncio.AbstractEventLoop
    repository: ModelRepository
    port: int
    auth_port: int

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await work()

        future: Future[T] = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return future.result(60)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # Until config.py's DEFAULT_MODEL_FILENAME lists "python" itself.
    added = "python" not in config_module.DEFAULT_MODEL_FILENAME
    config_module.DEFAULT_MODEL_FILENAME.setdefault("python", "model.py")
    root = make_repository(tmp_path_factory.mktemp("http-repo"), examples_dir, ("tiny",))
    _python_model(root, "add_sub", ADD_SUB_CONFIG, ADD_SUB_MODEL)
    _python_model(root, "upper", UPPER_CONFIG, UPPER_MODEL)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="http-test-loop", daemon=True)
    thread.start()
    repository = ModelRepository(root, Metrics())
    path = InferencePath(repository)
    frontend = HttpFrontend(path, max_body_bytes=MAX_BODY)
    guarded = HttpFrontend(path, AccessPolicy({"user-token": "infer", "admin-token": "admin"}))

    async def start() -> tuple[int, int]:
        await repository.load_all()
        return await frontend.start("127.0.0.1", 0), await guarded.start("127.0.0.1", 0)

    async def stop() -> None:
        await frontend.stop()
        await guarded.stop()
        await repository.close()

    try:
        port, auth_port = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
        yield Served(loop, repository, port, auth_port)
        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        if added:
            config_module.DEFAULT_MODEL_FILENAME.pop("python", None)


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[Any]:
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(served.url)
    yield c
    c.close()


def _post(
    port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _f32(array: object) -> npt.NDArray[np.float32]:
    return np.asarray(array, dtype=np.float32)


# -- tritonclient.http, unchanged ----------------------------------------------------------


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("no_such_model")
    server = client.get_server_metadata()
    assert server["name"] == "convoy" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["versions"] == ["1"]
    config = client.get_model_config("add_sub")
    assert config["backend"] == "python"
    assert config["input"][0]["dims"] == [4]  # numbers, as Triton writes them
    assert config["max_batch_size"] == 8


@pytest.mark.parametrize("binary", [True, False])
def test_infer_through_the_python_backend(client: Any, binary: bool) -> None:
    import tritonclient.http as httpclient

    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    inputs = [
        httpclient.InferInput("INPUT0", [2, 4], "FP32"),
        httpclient.InferInput("INPUT1", [2, 4], "FP32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary),
    ]
    result = client.infer("add_sub", inputs, outputs=outputs, request_id="req-7")
    np.testing.assert_array_equal(_f32(result.as_numpy("OUTPUT0")), a + b)
    np.testing.assert_array_equal(_f32(result.as_numpy("OUTPUT1")), a - b)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "1"


def test_json_and_binary_answers_agree(client: Any) -> None:
    import tritonclient.http as httpclient

    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)
    answers = []
    for binary in (True, False):
        tensor = httpclient.InferInput("INPUT0", [3, 16], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
        answers.append(client.infer("tiny", [tensor], outputs=[out]).as_numpy("OUTPUT0"))
    assert answers[0].shape == (3, 16)
    np.testing.assert_allclose(_f32(answers[0]), _f32(answers[1]), rtol=1e-6)
    # No outputs named: all of them, as binary (tritonclient's binary_data_output).
    tensor = httpclient.InferInput("INPUT0", [3, 16], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(
        _f32(client.infer("tiny", [tensor]).as_numpy("OUTPUT0")), _f32(answers[0])
    )


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(client: Any, binary: bool) -> None:
    import tritonclient.http as httpclient

    text = np.array([b"hello", b"convoy", b""], dtype=np.object_)
    tensor = httpclient.InferInput("TEXT", [3], "BYTES")
    tensor.set_data_from_numpy(text, binary_data=binary)
    out = httpclient.InferRequestedOutput("UPPER", binary_data=binary)
    result = client.infer("upper", [tensor], outputs=[out])
    assert [
        bytes(x) if not isinstance(x, str) else x.encode() for x in result.as_numpy("UPPER")
    ] == [
        b"HELLO",
        b"CONVOY",
        b"",
    ]


def test_statistics_and_repository(client: Any) -> None:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    client.infer("tiny", [tensor])
    stats = client.get_inference_statistics("tiny")["model_stats"][0]
    assert stats["name"] == "tiny" and stats["inference_count"] >= 1
    assert isinstance(stats["inference_stats"]["success"]["count"], int)
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index["add_sub"]["state"] == "READY"
    client.unload_model("upper")
    assert not client.is_model_ready("upper")
    client.load_model("upper")
    assert client.is_model_ready("upper")


def test_errors_carry_tritons_status_codes(client: Any) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    tensor = httpclient.InferInput("INPUT0", [1, 15], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 15), dtype=np.float32))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("tiny", [tensor])
    assert bad.value.status() == "400" and "unexpected shape" in bad.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.infer("no_such_model", [tensor])
    assert missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as meta:
        client.get_model_metadata("no_such_model")
    assert meta.value.status() == "404"


# -- bearer tokens -------------------------------------------------------------------------


def test_bearer_tokens_as_on_grpc(served: Served) -> None:
    port = served.auth_port
    assert _get(port, "/v2/health/ready")[0] == 200  # probes stay open
    status, body = _get(port, "/v2/models/tiny")
    assert status == 401 and "Bearer" in json.loads(body)["error"]
    assert _get(port, "/v2/models/tiny", {"Authorization": "Bearer wrong"})[0] == 401
    assert _get(port, "/v2/models/tiny", {"Authorization": "Bearer user-token"})[0] == 200
    status, body = _post(
        port, "/v2/repository/models/upper/unload", b"{}", {"Authorization": "Bearer user-token"}
    )
    assert status == 403 and "admin" in json.loads(body)["error"]


# -- the malformed corpus: 400-class, never 500 ---------------------------------------------


def _binary_request(
    header: dict[str, Any], payload: bytes, declared: int | None = None
) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    length = len(text) if declared is None else declared
    return text + payload, {HEADER: str(length), "Content-Type": "application/octet-stream"}


HEADER = "Inference-Header-Content-Length"
ROW = np.zeros(16, dtype=np.float32).tobytes()


def _json(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _tiny(shape: list[Any], data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "INPUT0", "shape": shape, "datatype": datatype, "data": data}


MALFORMED: list[tuple[str, bytes, dict[str, str]]] = [
    ("not json", b"{nope", {}),
    ("not utf-8", b"\xff\xfe{}", {}),
    ("json array", b"[]", {}),
    ("no inputs", b"{}", {}),
    ("inputs not a list", b'{"inputs": {"name": "INPUT0"}}', {}),
    ("input not an object", _json([42]), {}),  # type: ignore[list-item]
    ("no name", _json([{"shape": [1, 16], "datatype": "FP32", "data": [0] * 16}]), {}),
    ("wrong shape", _json([_tiny([1, 15], [0.0] * 15)]), {}),
    ("negative dim", _json([_tiny([-1, 16], [0.0] * 16)]), {}),
    ("bool dim", _json([_tiny([True, 16], [0.0] * 16)]), {}),
    ("float dim", _json([_tiny([1.0, 16], [0.0] * 16)]), {}),
    ("too few values", _json([_tiny([1, 16], [0.0] * 15)]), {}),
    ("too many values", _json([_tiny([1, 16], [0.0] * 17)]), {}),
    ("strings for FP32", _json([_tiny([1, 16], ["1.5"] * 16)]), {}),
    ("objects in data", _json([_tiny([1, 16], [{}] * 16)]), {}),
    ("data not a list", _json([_tiny([1, 16], 3.0)]), {}),
    ("wrong datatype", _json([_tiny([1, 16], [0] * 16, "INT32")]), {}),
    ("unknown datatype", _json([_tiny([1, 16], [0] * 16, "FP128")]), {}),
    ("int overflow", _json([_tiny([1, 16], [2**70] * 16, "INT32")]), {}),
    (
        "deep nesting",
        b'{"inputs": [{"name": "INPUT0", "data": ' + b"[" * 100000 + b"]" * 100000 + b"}]}",
        {},
    ),
    (
        "unknown input",
        _json([{"name": "X", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]),
        {},
    ),
    ("huge declared shape", _json([_tiny([1, 2**40], [0.0] * 16)]), {}),
    ("batch over max", _json([_tiny([100000, 16], [0.0] * 16)]), {}),
    ("no data", _json([{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32"}]), {}),
    ("bad output", _json([_tiny([1, 16], [0.0] * 16)], outputs=[{"name": "NOPE"}]), {}),
    ("outputs not a list", _json([_tiny([1, 16], [0.0] * 16)], outputs={}), {}),
    ("bad parameters", _json([_tiny([1, 16], [0.0] * 16)], parameters=[1]), {}),
    (
        "bad classification",
        _json(
            [_tiny([1, 16], [0.0] * 16)],
            outputs=[{"name": "OUTPUT0", "parameters": {"classification": "3"}}],
        ),
        {},
    ),
    ("bad priority", _json([_tiny([1, 16], [0.0] * 16)], parameters={"priority": -1}), {}),
    ("id not a string", _json([_tiny([1, 16], [0.0] * 16)], id=5), {}),
    (
        "header length past the body",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            },
            ROW,
            declared=10**6,
        ),
    ),
    (
        "header length negative",
        *_binary_request({"inputs": []}, b"", declared=-5),
    ),
    ("header length not a number", b"{}", {HEADER: "ten"}),
    (
        "binary size past the body",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 65},
                    }
                ]
            },
            ROW,
        ),
    ),
    (
        "huge binary size",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 2**62},
                    }
                ]
            },
            ROW,
        ),
    ),
    (
        "negative binary size",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": -1},
                    }
                ]
            },
            ROW,
        ),
    ),
    (
        "binary size not matching the shape",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [2, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            },
            ROW,
        ),
    ),
    (
        "binary bytes left over",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            },
            ROW + b"xx",
        ),
    ),
    (
        "data and binary both",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "data": [0.0] * 16,
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            },
            ROW,
        ),
    ),
    (
        "huge shape with binary data",
        *_binary_request(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [256, 2**40],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            },
            ROW,
        ),
    ),
]


@pytest.mark.parametrize(("case", "body", "headers"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_answer_400_class(
    served: Served, case: str, body: bytes, headers: dict[str, str]
) -> None:
    status, answer = _post(served.port, "/v2/models/tiny/infer", body, headers)
    assert 400 <= status < 500, (case, status, answer[:300])
    assert json.loads(answer)["error"]


def test_malformed_bytes_input(served: Served) -> None:
    body, headers = _binary_request(
        {
            "inputs": [
                {
                    "name": "TEXT",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        },
        struct.pack("<I", 1000) + b"abcd",  # an element claiming 1000 bytes
    )
    status, answer = _post(served.port, "/v2/models/upper/infer", body, headers)
    assert status == 400, answer


def test_bodies_over_the_limit_are_refused(served: Served) -> None:
    status, answer = _post(served.port, "/v2/models/tiny/infer", b"x" * (MAX_BODY + 1))
    assert status == 413 and json.loads(answer)["error"]
    # A declared length over the limit is refused before the body is read.
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        connection.putrequest("POST", "/v2/models/tiny/infer")
        connection.putheader("Content-Length", str(1 << 40))
        connection.endheaders()
        connection.send(b"{}")
        assert connection.getresponse().status == 413
    finally:
        connection.close()


def test_unknown_routes_and_methods(served: Served) -> None:
    assert _get(served.port, "/v2/nothing")[0] == 404
    assert _get(served.port, "/v2/models/tiny/infer")[0] == 405


def test_memory_stays_bounded_by_the_body(served: Served) -> None:
    """Declared sizes (shape, binary_data_size) never size an allocation."""
    body, headers = _binary_request(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [256, 2**34],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 2**40},
                }
            ]
        },
        ROW * 4,
    )
    tracemalloc.start()
    try:
        for _ in range(3):
            status, _answer = _post(served.port, "/v2/models/tiny/infer", body, headers)
            assert status == 400
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes for a {len(body)}-byte request"


def test_shared_memory_over_http_is_refused_by_name(served: Served) -> None:
    body = _json(
        [
            {
                "name": "INPUT0",
                "shape": [1, 16],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64},
            }
        ]
    )
    status, answer = _post(served.port, "/v2/models/tiny/infer", body)
    assert status == 501 and "use gRPC" in json.loads(answer)["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(client: Any, algorithm: str) -> None:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
    other = httpclient.InferInput("INPUT1", [2, 4], "FP32")
    other.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
    result = client.infer(
        "add_sub",
        [tensor, other],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(_f32(result.as_numpy("OUTPUT0")), np.full((2, 4), 2.0))


def test_a_compressed_bomb_is_bounded_by_the_body_limit(served: Served) -> None:
    bomb = gzip.compress(b"\0" * (32 << 20))  # 32 MiB of zeros in ~32 KiB
    tracemalloc.start()
    try:
        status, _answer = _post(
            served.port, "/v2/models/tiny/infer", bomb, {"Content-Encoding": "gzip"}
        )
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    assert peak < 4 * MAX_BODY + (8 << 20)


def test_other_extensions_are_refused_by_name(client: Any) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as refused:
        client.get_system_shared_memory_status()
    assert refused.value.status() == "501" and "gRPC" in refused.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_large_bodies_are_read_and_written_off_the_loop(client: Any, binary: bool) -> None:
    import tritonclient.http as httpclient

    text = np.array([b"a" * (300 << 10), b"b"], dtype=np.object_)  # past the inline size
    tensor = httpclient.InferInput("TEXT", [2], "BYTES")
    tensor.set_data_from_numpy(text, binary_data=binary)
    out = httpclient.InferRequestedOutput("UPPER", binary_data=binary)
    upper = client.infer("upper", [tensor], outputs=[out]).as_numpy("UPPER")
    first = upper[0] if isinstance(upper[0], bytes) else str(upper[0]).encode()
    assert first == b"A" * (300 << 10)
