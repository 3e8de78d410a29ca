"""Every class of bad input gets the right status and a message naming the problem,
and the server keeps serving afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess

pytestmark = pytest.mark.e2e


def good_input(rows: int = 1) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", [rows, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 16), np.float32))
    return tensor


def expect_error(
    client: grpcclient.InferenceServerClient, status: str, *words: str, **kwargs: object
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(**kwargs)  # type: ignore[arg-type]
    assert info.value.status() == f"StatusCode.{status}", str(info.value)
    for word in words:
        assert word in info.value.message(), info.value.message()
    # ...and the server still answers a good request.
    result = client.infer("tiny", [good_input()])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 3.0, np.float32))


def test_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    expect_error(client, "NOT_FOUND", "nope", model_name="nope", inputs=[good_input()])


def test_unknown_version(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        client,
        "NOT_FOUND",
        "version 7",
        model_name="tiny",
        model_version="7",
        inputs=[good_input()],
    )


def test_wrong_datatype(client: grpcclient.InferenceServerClient) -> None:
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.int32))
    expect_error(
        client, "INVALID_ARGUMENT", "INPUT0", "INT32", "FP32", model_name="tiny", inputs=[tensor]
    )


def test_wrong_shape(client: grpcclient.InferenceServerClient) -> None:
    tensor = grpcclient.InferInput("INPUT0", [1, 15], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 15), np.float32))
    expect_error(
        client,
        "INVALID_ARGUMENT",
        "INPUT0",
        "shape",
        "[-1, 16]",
        model_name="tiny",
        inputs=[tensor],
    )


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        client, "INVALID_ARGUMENT", "INPUT", "missing", model_name="image_classifier", inputs=[]
    )


def test_unknown_input(client: grpcclient.InferenceServerClient) -> None:
    extra = grpcclient.InferInput("EXTRA", [1, 16], "FP32")
    extra.set_data_from_numpy(np.ones((1, 16), np.float32))
    expect_error(
        client, "INVALID_ARGUMENT", "EXTRA", model_name="tiny", inputs=[good_input(), extra]
    )


def test_unknown_output(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        client,
        "INVALID_ARGUMENT",
        "NOPE",
        model_name="tiny",
        inputs=[good_input()],
        outputs=[grpcclient.InferRequestedOutput("NOPE")],
    )


def test_batch_over_the_maximum(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        client,
        "INVALID_ARGUMENT",
        "batch size 257",
        "256",
        model_name="tiny",
        inputs=[good_input(257)],
    )


def raw_call(server: ServerProcess, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        return info.value


def test_content_size_mismatch(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\0" * 60)  # 15 floats, not 16
    error = raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in error.details() and "60 bytes" in error.details() and "64" in error.details()
    assert client.infer("tiny", [good_input()]).as_numpy("OUTPUT0") is not None


def test_typed_contents_count_mismatch(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend([1.0] * 10)
    error = raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fp32_contents" in error.details() and "16" in error.details()


def test_typed_contents_are_accepted(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend(range(16))
    with grpc.insecure_channel(server.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=10
        )
    out = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(out, np.arange(16, dtype=np.float32) * 2 + 1)


def test_raw_contents_count_mismatch(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    error = raw_call(server, request)  # neither raw nor typed contents
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in error.details()


def test_malformed_bytes_tensor(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="minilm_embedding")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x40\0\0\0short")  # claims 64 bytes, has 5
    error = raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TEXT" in error.details() and "64 bytes" in error.details()


def test_bad_parameter_type(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\0" * 64)
    request.parameters["timeout"].string_param = "soon"
    error = raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout" in error.details()


def test_failures_are_counted(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [grpcclient.InferInput("INPUT0", [1, 3], "FP32")])
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    fails = lambda s: int(s["inference_stats"].get("fail", {}).get("count", 0))  # noqa: E731
    assert fails(after) == fails(before) + 1
