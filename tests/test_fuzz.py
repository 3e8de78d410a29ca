"""Property-based fuzzing: mutated requests and mutated config.pbtxt files.

Every case gets a proper answer (a result or a clear error status with a
message), nothing else; the server keeps serving throughout.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convoy.config import read_model_config, validate_model_config
from convoy.errors import ConfigError

from .conftest import ServerProcess

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a `timeout` parameter of a few microseconds
}
DATATYPES = ["FP32", "FP16", "INT64", "INT8", "BYTES", "BOOL", "BF16", "", "fp32", "COMPLEX"]


def valid_request(model: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="fuzz")
    if model == "minilm_embedding":
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(b"\x05\x00\x00\x00hello")
    else:
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
        request.raw_input_contents.append(np.ones(32, np.float32).tobytes())
    return request


mutation = st.one_of(
    st.tuples(st.just("datatype"), st.sampled_from(DATATYPES)),
    st.tuples(st.just("shape"), st.lists(st.integers(-3, 2**40), max_size=5)),
    st.tuples(st.just("name"), st.sampled_from(["INPUT0", "TEXT", "", "X" * 300, "INPUT1"])),
    st.tuples(st.just("raw"), st.binary(max_size=200)),
    st.tuples(st.just("drop_raw"), st.none()),
    st.tuples(st.just("extra_raw"), st.binary(max_size=16)),
    st.tuples(st.just("duplicate_input"), st.none()),
    st.tuples(st.just("typed"), st.lists(st.floats(allow_nan=True), max_size=40)),
    st.tuples(st.just("model"), st.sampled_from(["tiny", "nope", "", "../tiny", "tiny\0"])),
    st.tuples(st.just("version"), st.sampled_from(["", "1", "2", "-1", "abc", "9" * 30])),
    st.tuples(st.just("output"), st.sampled_from(["OUTPUT0", "NOPE", ""])),
    st.tuples(
        st.just("param"),
        st.tuples(
            st.sampled_from(["timeout", "priority", "other"]),
            st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=5), st.booleans()),
        ),
    ),
)


def mutate(request: service_pb2.ModelInferRequest, change: tuple[str, object]) -> None:
    kind, value = change
    tensor = request.inputs[0] if request.inputs else request.inputs.add(name="INPUT0")
    if kind == "datatype":
        tensor.datatype = value  # type: ignore[assignment]
    elif kind == "shape":
        del tensor.shape[:]
        tensor.shape.extend(value)  # type: ignore[arg-type]
    elif kind == "name":
        tensor.name = value  # type: ignore[assignment]
    elif kind == "raw":
        del request.raw_input_contents[:]
        request.raw_input_contents.append(value)  # type: ignore[arg-type]
    elif kind == "drop_raw":
        del request.raw_input_contents[:]
    elif kind == "extra_raw":
        request.raw_input_contents.append(value)  # type: ignore[arg-type]
    elif kind == "duplicate_input":
        request.inputs.add().CopyFrom(tensor)
        if request.raw_input_contents:
            request.raw_input_contents.append(request.raw_input_contents[0])
    elif kind == "typed":
        del request.raw_input_contents[:]
        tensor.contents.fp32_contents.extend(value)  # type: ignore[arg-type]
    elif kind == "model":
        request.model_name = value  # type: ignore[assignment]
    elif kind == "version":
        request.model_version = value  # type: ignore[assignment]
    elif kind == "output":
        request.outputs.add(name=value)  # type: ignore[arg-type]
    elif kind == "param":
        key, param = value  # type: ignore[misc]
        if isinstance(param, bool):
            request.parameters[key].bool_param = param
        elif isinstance(param, int):
            request.parameters[key].int64_param = param
        else:
            request.parameters[key].string_param = param


@pytest.mark.e2e
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    model=st.sampled_from(["tiny", "minilm_embedding"]),
    changes=st.lists(mutation, min_size=1, max_size=4),
)
def test_mutated_requests_get_proper_answers(
    server: ServerProcess, model: str, changes: list[tuple[str, object]]
) -> None:
    request = valid_request(model)
    for change in changes:
        mutate(request, change)
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details(), "an error must say what is wrong"
        assert code in ALLOWED, (code, request)
        live = stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
        assert live.live


VALID_CONFIG = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 2 ] } ]
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 100
  priority_levels: 2 default_priority_level: 1 }
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy { latest { num_versions: 2 } }
parameters { key: "latency_slo_p99_ms" value { string_value: "20" } }
"""


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(VALID_CONFIG)),
            st.integers(0, 8),
            st.text(alphabet=' {}[]:"-0123456789abcdefxyTYPE_\n#', max_size=6),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_configs_load_or_name_the_problem(
    tmp_path: Path, edits: list[tuple[int, int, str]]
) -> None:
    text = VALID_CONFIG
    for position, length, insert in edits:
        position = min(position, len(text))
        text = text[:position] + insert + text[position + length :]
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    try:
        validate_model_config(read_model_config(model), str(model / "config.pbtxt"), "m")
    except ConfigError as exc:
        assert "config.pbtxt" in exc.message
