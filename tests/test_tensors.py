from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convoy.errors import InvalidInput
from convoy.tensors import (
    bf16_to_float,
    deserialize_bytes,
    float_to_bf16,
    numpy_dtype,
    serialize_bytes,
    wire_datatype,
)


@given(st.lists(st.binary(max_size=50), max_size=20))
def test_bytes_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    wire = serialize_bytes(array)
    back = deserialize_bytes(wire, len(items), "input 'X'")
    assert list(back) == items


def test_bytes_errors_name_the_field() -> None:
    with pytest.raises(InvalidInput, match=r"input 'T'.*claims 9 bytes"):
        deserialize_bytes(b"\x09\0\0\0abc", 1, "input 'T'")
    with pytest.raises(InvalidInput, match=r"input 'T'.*holds 1 elements.*asks for 2"):
        deserialize_bytes(b"\x01\0\0\0abcd", 2, "input 'T'")
    with pytest.raises(InvalidInput, match="left over"):
        deserialize_bytes(b"\x01\0\0\0ab", 1, "input 'T'")


def test_datatypes() -> None:
    assert numpy_dtype("FP16") == np.float16
    assert wire_datatype(np.dtype(np.int8)) == "INT8"
    assert wire_datatype(np.dtype(object)) == "BYTES"
    assert numpy_dtype("BF16") == np.uint16  # bit patterns: numpy has no bfloat16
    with pytest.raises(InvalidInput, match="FP8"):
        numpy_dtype("FP8")


def test_bf16_round_trip_rounds_to_nearest_even() -> None:
    import torch

    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    bits = float_to_bf16(values)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(bits, expected.view(np.uint16))
    back = bf16_to_float(bits)
    np.testing.assert_allclose(back, values, rtol=2**-8)


def test_declared_bytes_count_is_checked_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 2: 2^28 elements declared over 5 bytes: refused, nothing allocated."""
    import convoy.tensors as tensors

    def no_allocation(*args: object, **kwargs: object) -> None:
        raise AssertionError("allocated before checking the payload")

    monkeypatch.setattr(tensors.np, "empty", no_allocation)
    with pytest.raises(InvalidInput, match=r"input 'T'.*268435455 BYTES elements.*5 bytes"):
        deserialize_bytes(b"\x01\0\0\0a", 268_435_455, "input 'T'")
