"""`triton_python_backend_utils`, the module Triton python models import as `pb_utils`.

The names, signatures and behaviours follow Triton's python backend
(src/resources/triton_python_backend_utils.py and the stub's pybind classes),
so a `model.py` written for Triton runs unchanged. The backend in
triton_python.py registers this module under its Triton name before it runs a
model's code. Decoupled responses (`get_response_sender`) and BLS
(`InferenceRequest(...).exec()`) are refused with DecoupledNotSupported and
BLSNotSupported, both TritonModelException, so a model that catches those sees them.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

_log = logging.getLogger("triton_python_backend_utils")

# TRITONSERVER_DataType numbers, as Tensor.triton_dtype() reports them.
TRITONSERVER_TYPE_INVALID = 0
TRITONSERVER_TYPE_BOOL = 1
TRITONSERVER_TYPE_UINT8 = 2
TRITONSERVER_TYPE_UINT16 = 3
TRITONSERVER_TYPE_UINT32 = 4
TRITONSERVER_TYPE_UINT64 = 5
TRITONSERVER_TYPE_INT8 = 6
TRITONSERVER_TYPE_INT16 = 7
TRITONSERVER_TYPE_INT32 = 8
TRITONSERVER_TYPE_INT64 = 9
TRITONSERVER_TYPE_FP16 = 10
TRITONSERVER_TYPE_FP32 = 11
TRITONSERVER_TYPE_FP64 = 12
TRITONSERVER_TYPE_BYTES = 13
TRITONSERVER_TYPE_BF16 = 14

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

TRITON_STRING_TO_NUMPY: dict[str, type[Any]] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

_TRITON_TO_NUMPY: dict[int, type[Any]] = {
    TRITONSERVER_TYPE_BOOL: np.bool_,
    TRITONSERVER_TYPE_UINT8: np.uint8,
    TRITONSERVER_TYPE_UINT16: np.uint16,
    TRITONSERVER_TYPE_UINT32: np.uint32,
    TRITONSERVER_TYPE_UINT64: np.uint64,
    TRITONSERVER_TYPE_INT8: np.int8,
    TRITONSERVER_TYPE_INT16: np.int16,
    TRITONSERVER_TYPE_INT32: np.int32,
    TRITONSERVER_TYPE_INT64: np.int64,
    TRITONSERVER_TYPE_FP16: np.float16,
    TRITONSERVER_TYPE_FP32: np.float32,
    TRITONSERVER_TYPE_FP64: np.float64,
    TRITONSERVER_TYPE_BYTES: np.object_,
}
_NUMPY_TO_TRITON: dict[np.dtype[Any], int] = {np.dtype(t): n for n, t in _TRITON_TO_NUMPY.items()}


def triton_string_to_numpy(triton_type_string: str) -> type[Any]:
    """'TYPE_FP32' (a config's data_type) -> np.float32."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> type[Any] | None:
    return _TRITON_TO_NUMPY.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    if dtype.kind == "S":  # np.bytes_ of any width is BYTES, as in Triton
        return TRITONSERVER_TYPE_BYTES
    return _NUMPY_TO_TRITON.get(dtype)


def serialize_byte_tensor(input_tensor: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """BYTES elements, each as a 4-byte little-endian length and its bytes, in C order."""
    if input_tensor.size == 0:
        return None
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts: list[bytes] = []
    for item in input_tensor.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> npt.NDArray[np.object_]:
    items: list[bytes] = []
    offset = 0
    while offset < len(encoded_tensor):
        (length,) = struct.unpack_from("<I", encoded_tensor, offset)
        offset += 4
        items.append(bytes(encoded_tensor[offset : offset + length]))
        offset += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


class TritonError:
    """An error a model puts in one InferenceResponse; fails only that request."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def __str__(self) -> str:
        return self._message

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    """Raised by (or at) a model; fails the requests of the execute call it escapes."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def message(self) -> str:
        return self._message


class DecoupledNotSupported(TritonModelException):
    """Convoy answers each request once, from execute's return value."""


class BLSNotSupported(TritonModelException):
    """Convoy runs no inference requests issued from inside a model."""


class Tensor:
    """A named numpy array: an input of a request or an output of a response."""

    def __init__(
        self, name: str, numpy_array: npt.NDArray[Any], triton_dtype: int | None = None
    ) -> None:
        array = np.asarray(numpy_array)
        if array.dtype.type == np.str_ or array.dtype.type == np.void:
            # Triton refuses these too: fixed-width unicode is not the BYTES layout.
            raise TritonModelException(
                "Tensor dtype used for numpy_array is not supported by Python backend. "
                "Please use np.object_ instead."
            )
        if triton_dtype is not None:
            wanted = triton_to_numpy_type(triton_dtype)
            if wanted is not None and array.dtype != wanted:
                array = array.view(wanted)
        else:
            triton_dtype = numpy_to_triton_type(array.dtype)
        self._name = name
        self._array = array
        self._triton_dtype = triton_dtype if triton_dtype is not None else 0

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> npt.NDArray[Any]:
        return self._array

    def triton_dtype(self) -> int:
        return self._triton_dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, dlpack_tensor: Any) -> Tensor:
        return Tensor(name, np.from_dlpack(dlpack_tensor))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={list(self._array.shape)}, dtype={self._array.dtype})"


class InferenceRequest:
    """One client request, as execute() receives it.

    Triton models also construct these to call other models (BLS); Convoy accepts
    the constructor and refuses exec()/async_exec() with BLSNotSupported.
    """

    def __init__(
        self,
        model_name: str = "",
        inputs: Sequence[Tensor] = (),
        requested_output_names: Sequence[str] = (),
        request_id: str = "",
        correlation_id: int | str = 0,
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        parameters: Mapping[str, Any] | str | None = None,
        **_ignored: Any,  # preferred_memory, trace: BLS-only, refused at exec()
    ) -> None:
        self._model_name = model_name
        self._inputs = list(inputs)
        self._requested_output_names = list(requested_output_names)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._model_version = model_version
        self._flags = flags
        self._timeout = timeout
        if parameters is None:
            parameters = {}
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters)

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def parameters(self) -> str:
        """The request's parameters as a JSON string, as Triton hands them over."""
        return self._parameters

    def is_cancelled(self) -> bool:
        return False

    def get_response_sender(self) -> Any:
        raise DecoupledNotSupported(
            "decoupled mode (InferenceRequest.get_response_sender) is not supported by "
            "Convoy's python backend: return one InferenceResponse per request from execute"
        )

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        raise BLSNotSupported(
            "BLS (InferenceRequest.exec) is not supported by Convoy's python backend: "
            f"model '{self._model_name}' cannot be called from inside a model; "
            "use an ensemble or call it from the client"
        )

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse:
        return self.exec(decoupled)


class InferenceResponse:
    """The answer to one request: its output tensors, or an error for it alone."""

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: Mapping[str, Any] | str | None = None,
    ) -> None:
        if output_tensors is None:
            output_tensors = []
        if not isinstance(output_tensors, list | tuple):
            raise TritonModelException('"output_tensors" must be a list.')
        self._output_tensors = list(output_tensors)
        self._error = error
        self._parameters = parameters

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_model_config(args: Mapping[str, str] | str) -> dict[str, Any]:
    """The model configuration as a dict, from initialize's args (or the JSON string
    args['model_config'] itself): what Triton models write as json.loads(...)."""
    text = args if isinstance(args, str) else args["model_config"]
    config: dict[str, Any] = json.loads(text)
    return config


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for properties in model_config.get("input", ()):
        if properties["name"] == name:
            return dict(properties)
    return None


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for properties in model_config.get("output", ()):
        if properties["name"] == name:
            return dict(properties)
    return None


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    policy = model_config.get("model_transaction_policy") or {}
    return bool(policy.get("decoupled", False))


class Logger:
    """pb_utils.Logger: the model's messages go to the server's log."""

    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3
    _LEVELS = {INFO: logging.INFO, WARNING: logging.WARNING, ERROR: logging.ERROR, VERBOSE: 5}

    @staticmethod
    def log(message: str, level: int = INFO) -> None:
        _log.log(Logger._LEVELS.get(level, logging.INFO), "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        _log.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.log(5, "%s", message)
