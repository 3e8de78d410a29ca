"""The codec on its own: per-request validation that must happen before queueing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from convoy.backends.base import ShapeRange
from convoy.config import read_model_config, validate_model_config
from convoy.errors import InvalidInput
from convoy.inference.codec import decode_request
from convoy.pb import grpc_service_pb2 as pb

CONFIG = """
name: "m"
platform: "tensorrt_plan"
max_batch_size: 8
input [ { name: "ids" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "mask" data_type: TYPE_INT64 dims: [ -1 ] optional: true } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def spec(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.pbtxt").write_text(CONFIG)
    config = read_model_config(tmp_path / "m")
    return validate_model_config(config, str(tmp_path / "m" / "config.pbtxt"), "m")


def request(*inputs: tuple[str, int]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    for name, width in inputs:
        message.inputs.add(name=name, datatype="INT64", shape=[1, width])
        message.raw_input_contents.append(np.zeros((1, width), np.int64).tobytes())
    return message


def decode(tmp_path: Path, message: pb.ModelInferRequest, **kwargs: object):  # type: ignore[no-untyped-def]
    loop = asyncio.new_event_loop()
    try:
        return decode_request(message, spec(tmp_path), loop, 0, None, **kwargs)  # type: ignore[arg-type]
    finally:
        loop.close()


def test_a_dim_past_the_engine_profile_is_refused_at_decode(tmp_path: Path) -> None:
    """Issue 10 item 12: refused for this request (INVALID_ARGUMENT), not failing the
    batch it would have joined with INTERNAL."""
    bounds = {"ids": ShapeRange(min=(1,), max=(128,))}
    with pytest.raises(InvalidInput, match=r"input 'ids'.*\[300\].*max \[128\]"):
        decode(tmp_path, request(("ids", 300)), bounds=bounds)
    assert decode(tmp_path, request(("ids", 128)), bounds=bounds).rows == 1


def test_shape_key_is_by_name_in_config_order(tmp_path: Path) -> None:
    """Issue 10 item 4: the same inputs in another order batch together; a request
    without the optional input never shares a batch with one that sends it."""
    a = decode(tmp_path, request(("ids", 4), ("mask", 4)))
    b = decode(tmp_path, request(("mask", 4), ("ids", 4)))
    c = decode(tmp_path, request(("ids", 4)))
    assert a.shape_key == b.shape_key == (("ids", (4,)), ("mask", (4,)))
    assert c.shape_key == (("ids", (4,)),) != a.shape_key


def test_shapes_checked_against_fixed_and_variable_dims() -> None:
    """The per-request shape check: fixed dims by one comparison, -1 matching any size,
    a different rank never."""
    from convoy.config import TensorSpec

    fixed = TensorSpec("x", "FP32", (3, 4))
    variable = TensorSpec("x", "FP32", (-1, 4))
    assert fixed.matches((3, 4)) and not fixed.matches((4, 3)) and not fixed.matches((3,))
    assert variable.matches((7, 4)) and variable.matches((1, 4))
    assert not variable.matches((7, 5)) and not variable.matches((7, 4, 1))
    assert not variable.matches(())


def test_a_short_raw_entry_is_named_by_its_index(tmp_path: Path) -> None:
    message = request(("ids", 4), ("mask", 4))
    message.raw_input_contents[1] = b"\0" * 8
    with pytest.raises(InvalidInput, match=r"input 'mask': raw_input_contents\[1\] holds 8 bytes"):
        decode(tmp_path, message)


def test_missing_required_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"expects input\(s\) \['ids'\]"):
        decode(tmp_path, request(("mask", 4)))


@pytest.mark.parametrize(
    ("timeout_us", "remaining_s", "expected_ns"),
    [(None, None, None), (None, 2.0, 2_000_000_000), (500, None, 500_000),
     (500, 2.0, 500_000), (5_000_000, 2.0, 2_000_000_000)],
)  # fmt: skip
def test_the_deadline_is_the_earlier_of_timeout_and_caller(
    tmp_path: Path, timeout_us: int | None, remaining_s: float | None, expected_ns: int | None
) -> None:
    message = request(("ids", 4))
    if timeout_us is not None:
        message.parameters["timeout"].int64_param = timeout_us
    loop = asyncio.new_event_loop()
    try:
        # The caller's deadline is an instant (its door fixed it); 0 is now here.
        caller = None if remaining_s is None else int(remaining_s * 1e9)
        decoded = decode_request(message, spec(tmp_path), loop, 0, caller)
    finally:
        loop.close()
    assert decoded.deadline_ns == expected_ns


def test_the_background_parameter_queues_a_request_behind_every_caller(tmp_path: Path) -> None:
    """`convoy replay --server` sends it: the request waits in the background queue."""
    assert decode(tmp_path, request(("ids", 2))).background is False
    asked = request(("ids", 2))
    asked.parameters["background"].bool_param = True
    assert decode(tmp_path, asked).background is True
    asked.parameters["background"].string_param = "yes"
    with pytest.raises(InvalidInput, match="parameter 'background' must be a bool"):
        decode(tmp_path, asked)
