"""Triton datatypes <-> numpy, and the BYTES wire format.

Inside the server every tensor is a numpy array; BYTES tensors are object
arrays of `bytes`. On the wire, each BYTES element is a 4-byte little-endian
length followed by that many bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import InvalidInput

# A tensor inside the server: numpy, batch dimension first where the model batches.
Array = npt.NDArray[np.generic]


@dataclass(frozen=True)
class Ranking:
    """What to rank of one output for a batch: its top `k` values per row (the whole
    tensor as one row for a model without a batch dimension), by softmax if asked."""

    k: int
    softmax: bool
    per_row: bool


@dataclass(frozen=True)
class Ranked:
    """The top values of one output, highest first: values float32 and indices int64,
    both [rows, k]; text, where the instance has formatted them, the BYTES answer of
    Triton's classification extension ("value:index[:label]", [rows, k])."""

    values: Array
    indices: Array
    text: Array | None = None

    def rows(self, start: int, end: int) -> Ranked:
        text = None if self.text is None else self.text[start:end]
        return Ranked(self.values[start:end], self.indices[start:end], text)


# Wire datatype -> numpy dtype. numpy has no bfloat16: BF16 tensors travel inside the
# server as their raw 16-bit patterns (uint16), which backends that compute in bfloat16
# view as such (float_to_bf16 / bf16_to_float convert where a float is at hand).
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),
    "BYTES": np.dtype(np.object_),
}

# config.pbtxt DataType enum name -> wire datatype.
CONFIG_TO_WIRE: dict[str, str] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
WIRE_TO_CONFIG = {wire: cfg for cfg, wire in CONFIG_TO_WIRE.items()}

# Which InferTensorContents field carries each datatype (the typed slow path).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LEN = struct.Struct("<I")

# The wire is little-endian; these are the dtypes raw contents are read with.
WIRE_DTYPES: dict[str, np.dtype[np.generic]] = {
    name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"
}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype for a wire datatype; InvalidInput if numpy cannot hold it."""
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidInput(f"unsupported datatype '{datatype}'") from None


def wire_datatype(dtype: np.dtype[np.generic]) -> str:
    """The wire datatype for a numpy dtype (object and str arrays are BYTES)."""
    if dtype.kind in "OSU":
        return "BYTES"
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dtype:
            return name
    raise InvalidInput(f"numpy dtype {dtype} has no wire datatype")


def deserialize_bytes(buf: bytes | memoryview, count: int, field: str) -> npt.NDArray[np.object_]:
    """Parse `count` length-prefixed elements; InvalidInput naming `field` if malformed."""
    view = memoryview(buf)
    end = len(view)
    # Every element carries a 4-byte length: a shape that asks for more elements than
    # the bytes can hold is refused before anything is allocated (a 5-byte payload
    # declaring 2^28 elements must not cost 2 GB of object pointers).
    if count * _LEN.size > end:
        raise InvalidInput(
            f"{field}: shape asks for {count} BYTES elements but the data holds {end} bytes, "
            f"too few for even their 4-byte lengths"
        )
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"{field}: BYTES data holds {i} elements but the shape asks for {count}"
            )
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"{field}: BYTES element {i} claims {length} bytes, only {end - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(f"{field}: {end - offset} bytes left over after {count} BYTES elements")
    return out


def float_to_bf16(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of float values, rounded to nearest even (as torch does)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def bf16_to_float(bits: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    widened = np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return widened.view(np.float32)


def serialize_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """Length-prefix every element of a BYTES (object/str) array, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
