"""ModelInferRequest <-> InferRequest / InferResult.

Validation happens here, before anything is queued; every error names the
field at fault. raw_input_contents become numpy views without a copy.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping

import numpy as np

from convoy.kernels.classify import format_classes

from ..backends.base import ShapeRange, check_input_bounds
from ..batching.request import InferRequest, InferResult
from ..config import ModelSpec
from ..errors import InvalidInput
from ..pb import grpc_service_pb2 as pb
from ..tensors import (
    CONTENTS_FIELD,
    WIRE_DTYPES,
    Array,
    deserialize_bytes,
    float_to_bf16,
    numpy_dtype,
    serialize_bytes,
)
from .cuda_shm import OutputTarget, SharedMemory
from .shm import BYTE_SIZE, FRONTEND_INPUTS, OFFSET, REGION, Leases

# nbytes -> (region, offset, writable view of nbytes) or None (send it inline).
Place = Callable[[int], tuple[str, int, memoryview] | None]


def decode_request(
    request: pb.ModelInferRequest,
    spec: ModelSpec,
    loop: asyncio.AbstractEventLoop,
    now_ns: int,
    caller_deadline_ns: int | None,
    max_elements: int = 1 << 28,
    bounds: Mapping[str, ShapeRange] | None = None,
    shm: SharedMemory | None = None,
    leases: Leases | None = None,
) -> InferRequest:
    raw = request.raw_input_contents
    # Inputs in a shared memory region carry no raw_input_contents entry. They are
    # counted only where the caller found some: the common path scans the inputs once.
    in_shm = (
        sum(1 for t in request.inputs if t.parameters and REGION in t.parameters)
        if shm is not None
        else 0
    )
    if raw and len(raw) != len(request.inputs) - in_shm:
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs) - in_shm} inputs not in shared memory; send one entry "
            "per input"
        )
    raw_index = 0
    text_input = spec.options.text.input if spec.options.text is not None else None
    inputs: dict[str, Array] = {}
    item_shapes: dict[str, tuple[int, ...]] = {}
    rows: int | None = None
    for position, tensor in enumerate(request.inputs):
        name = tensor.name
        expected = spec.input(name)
        if expected is None:
            raise InvalidInput(
                f"unexpected inference input '{name}' for model '{spec.name}'; "
                f"expected one of {[t.name for t in spec.inputs]}"
            )
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears more than once")
        if tensor.datatype != expected.datatype:
            raise InvalidInput(
                f"input '{name}': datatype '{tensor.datatype}' does not match the model's "
                f"'{expected.datatype}'"
            )
        shape = tuple(tensor.shape)
        if shape and min(shape) < 0:
            raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
        if spec.batched:
            if not shape:
                raise InvalidInput(
                    f"input '{name}': shape is empty; the first dimension is the batch size"
                )
            batch, item = shape[0], shape[1:]
            if batch < 1 or batch > spec.max_batch_size:
                raise InvalidInput(
                    f"input '{name}': batch size {batch} is outside 1..{spec.max_batch_size} "
                    f"(max_batch_size of model '{spec.name}')"
                )
            if rows is not None and batch != rows:
                raise InvalidInput(
                    f"input '{name}': batch size {batch} differs from the other inputs' {rows}"
                )
            rows = batch
        else:
            item = shape
        if not expected.matches(item):
            full = ([-1] if spec.batched else []) + list(expected.dims)
            raise InvalidInput(
                f"input '{name}': unexpected shape {list(shape)} for model '{spec.name}'; "
                f"expected {full}"
            )
        if bounds:  # a TensorRT profile: refuse here rather than fail the whole batch
            check_input_bounds(bounds, name, item)
        count = math.prod(shape)  # Python ints: no overflow before the check
        if count > max_elements:
            raise InvalidInput(
                f"input '{name}': shape {list(shape)} has {count} elements, "
                f"over the server's limit of {max_elements}"
            )
        if in_shm and REGION in tensor.parameters:
            data = _shared_input(tensor, shm, leases)
            # A front end moved the client's raw_input_contents there: name what was sent.
            moved = tensor.parameters[REGION].string_param == FRONTEND_INPUTS
            where: int | str = position if moved else "shared memory"
            array = _from_raw(data, tensor.datatype, shape, count, name, where)
            if tensor.datatype != "BYTES":
                # Read-only, as inline inputs are: the memory is the client's (or a front
                # end's, freed and reused once answered), never the model's to write.
                array.flags.writeable = False
        elif raw:
            array = _from_raw(raw[raw_index], tensor.datatype, shape, count, name, raw_index)
            raw_index += 1
        else:
            array = _from_contents(tensor, shape, count)
        if name == text_input:
            _decode_text(array, name)
        inputs[name] = array
        item_shapes[name] = item
    # Every input sent, as in nearly every request: nothing can be missing.
    missing = (
        []
        if len(inputs) == len(spec.inputs)
        else [t.name for t in spec.inputs if not t.optional and t.name not in inputs]
    )
    if missing:
        raise InvalidInput(f"model '{spec.name}' expects input(s) {missing}, missing from request")
    outputs, classification = _requested_outputs(request, spec)
    return InferRequest(
        id=request.id,
        inputs=inputs,
        outputs=outputs,
        rows=rows if rows is not None else 1,
        shape_key=spec.shape_key(item_shapes),
        future=loop.create_future(),
        arrival_ns=now_ns,
        deadline_ns=_deadline(request.parameters, now_ns, caller_deadline_ns),
        priority=_priority(request.parameters, spec),
        classification=classification,
        background=asks_background(request.parameters),
    )


def _decode_text(array: Array, name: str) -> None:
    """Text for a tokenizer is decoded here, per request, so one request's bad bytes
    are its own INVALID_ARGUMENT and never fail the batch it would have joined."""
    flat = array.reshape(-1)
    for i, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                flat[i] = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"input '{name}': element {i} is not UTF-8 text ({exc.reason} at byte "
                    f"{exc.start})"
                ) from None


def _shared_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    shm: SharedMemory | None,
    leases: Leases | None,
) -> memoryview:
    field = f"input '{tensor.name}'"
    if shm is None or leases is None:
        raise InvalidInput(f"{field}: shared memory is not available on this endpoint")
    region, offset, size = shared_memory_params(tensor.parameters, field)
    return shm.input_view(field, region, offset, size, leases)


def shared_memory_params(
    params: Mapping[str, pb.InferParameter], field: str
) -> tuple[str, int, int]:
    """(region, offset, byte_size) of a tensor that names a shared memory region."""
    region = params[REGION]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidInput(f"{field}: parameter '{REGION}' must be a region name")
    if BYTE_SIZE not in params:
        raise InvalidInput(f"{field}: parameter '{BYTE_SIZE}' is missing")
    size = _int_param(params, BYTE_SIZE) or 0
    offset = _int_param(params, OFFSET) or 0
    return region.string_param, offset, size


def shared_outputs(
    request: pb.ModelInferRequest, shm: SharedMemory, leases: Leases
) -> dict[str, OutputTarget]:
    """Requested outputs to be written into shared memory regions, checked and leased
    (a CUDA region's copy is made by leases.commit(), before the answer is sent)."""
    targets: dict[str, OutputTarget] = {}
    for out in request.outputs:
        if out.parameters and REGION in out.parameters:
            field = f"output '{out.name}'"
            region, offset, size = shared_memory_params(out.parameters, field)
            targets[out.name] = shm.output(field, region, offset, size, leases)
    return targets


def _write_shared(
    tensor: pb.ModelInferResponse.InferOutputTensor,
    value: Array,
    datatype: str,
    target: OutputTarget,
) -> None:
    if datatype == "BYTES":
        data = np.frombuffer(serialize_bytes(value), np.uint8)
    else:
        data = np.ascontiguousarray(value, dtype=numpy_dtype(datatype)).reshape(-1).view(np.uint8)
    if data.nbytes > target.byte_size:
        raise InvalidInput(
            f"output '{tensor.name}': {data.nbytes} bytes do not fit the "
            f"{target.byte_size} bytes of its shared memory region"
        )
    target.write(data)
    tensor.parameters[BYTE_SIZE].int64_param = data.nbytes


def _from_raw(
    data: bytes | memoryview,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    name: str,
    where: int | str,
) -> Array:
    """`where` names what holds the bytes in an error: an int is an index into
    raw_input_contents (formatted only when there is an error to report)."""
    if datatype == "BYTES":
        return deserialize_bytes(data, count, f"input '{name}'").reshape(shape)
    dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{name}': unsupported datatype '{datatype}'")
    expected = count * dtype.itemsize
    if len(data) != expected:
        if isinstance(where, int):
            where = f"raw_input_contents[{where}]"
        raise InvalidInput(
            f"input '{name}': {where} holds {len(data)} bytes; "
            f"shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], count: int
) -> Array:
    name, datatype = tensor.name, tensor.datatype
    dtype = numpy_dtype(datatype)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input '{name}': {datatype} has no typed contents field; send raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}': contents.{field} holds {len(values)} elements; "
            f"shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidInput(f"input '{name}': a value does not fit {datatype}") from None


def _requested_outputs(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> tuple[tuple[str, ...], dict[str, int]]:
    if not request.outputs:
        return spec.output_names, {}
    names: list[str] = []
    classification: dict[str, int] = {}
    for out in request.outputs:
        if spec.output(out.name) is None:
            raise InvalidInput(
                f"unexpected inference output '{out.name}' for model '{spec.name}'; "
                f"expected one of {[t.name for t in spec.outputs]}"
            )
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested more than once")
        names.append(out.name)
        k = _int_param(out.parameters, "classification")
        if k:
            if spec.output(out.name).datatype == "BYTES":  # type: ignore[union-attr]
                raise InvalidInput(f"output '{out.name}': BYTES outputs cannot be classified")
            classification[out.name] = k
    return tuple(names), classification


def _int_param(params: Mapping[str, pb.InferParameter], key: str) -> int | None:
    if key not in params:
        return None
    param = params[key]
    choice = param.WhichOneof("parameter_choice")
    if choice == "int64_param":
        value = int(param.int64_param)
    elif choice == "uint64_param":
        value = int(param.uint64_param)
    else:
        raise InvalidInput(f"parameter '{key}' must be an integer, got {choice or 'nothing'}")
    if value < 0:
        raise InvalidInput(f"parameter '{key}' must be >= 0, got {value}")
    return value


def _deadline(
    params: Mapping[str, pb.InferParameter], now_ns: int, caller: int | None
) -> int | None:
    timeout = timeout_deadline(params, now_ns)
    if timeout is None:
        return caller
    return timeout if caller is None else min(timeout, caller)


def timeout_deadline(params: Mapping[str, pb.InferParameter], now_ns: int) -> int | None:
    """When Triton's `timeout` request parameter (microseconds) ends, counted from
    `now_ns`; None without one. InvalidInput for a value that is no count."""
    timeout_us = _int_param(params, "timeout") if params else None
    return now_ns + timeout_us * 1000 if timeout_us else None


def _priority(params: Mapping[str, pb.InferParameter], spec: ModelSpec) -> int:
    if not params:
        return 0
    priority = _int_param(params, "priority") or 0
    levels = spec.batching.priority_levels if spec.batching else 0
    if priority and levels and priority > levels:
        raise InvalidInput(
            f"parameter 'priority' {priority} is outside 1..{levels} "
            f"(priority_levels of model '{spec.name}')"
        )
    return priority


# The request parameter a client sets to queue its request behind every caller's
# (`convoy replay --server`, offline scoring against a live server): its own work
# demoted, never anyone else's, so no role is needed to set it.
BACKGROUND_PARAMETER = "background"


def asks_background(params: Mapping[str, pb.InferParameter]) -> bool:
    """The request parameter `background`; InvalidInput where it is not a bool. Callers
    mostly send no parameters: one length check."""
    if not params or BACKGROUND_PARAMETER not in params:
        return False
    param = params[BACKGROUND_PARAMETER]
    choice = param.WhichOneof("parameter_choice")
    if choice != "bool_param":
        raise InvalidInput(
            f"parameter '{BACKGROUND_PARAMETER}' must be a bool, got {choice or 'nothing'}"
        )
    return bool(param.bool_param)


def encode_response(
    request: pb.ModelInferRequest,
    spec: ModelSpec,
    version: int,
    asked: InferRequest,
    result: InferResult,
    labels: Mapping[str, list[str]] | None = None,
    shared: Mapping[str, OutputTarget] | None = None,
    place: Place | None = None,
) -> pb.ModelInferResponse:
    """`place(nbytes)`, where given, may hold a large output outside the message (a
    front end's shared memory): the answer then names (region, offset, byte_size) as
    a shared-memory output does, with an empty raw_output_contents entry."""
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=str(version), id=request.id
    )
    for name in asked.outputs:
        k = asked.classification.get(name)
        if k is None:
            value = result.outputs[name]
            datatype = spec.output(name).datatype  # type: ignore[union-attr]
        else:
            # Triton's classification extension: top-k "value:index[:label]" strings,
            # ranked and formatted on the instance; only slicing is left for here.
            ranked = result.ranked[name]
            if ranked.text is not None:
                value = ranked.text[:, :k]
                if not spec.batched:
                    value = value[0]
            else:
                values, indices = ranked.values[:, :k], ranked.indices[:, :k]
                if not spec.batched:
                    values, indices = values[0], indices[0]
                value = format_classes(values, indices, (labels or {}).get(name))
            datatype = "BYTES"
        tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        if shared and name in shared:
            _write_shared(tensor, value, datatype, shared[name])
            response.raw_output_contents.append(b"")  # keeps clients' output indices aligned
        elif datatype == "BYTES":
            response.raw_output_contents.append(serialize_bytes(value))
        else:
            if datatype == "BF16" and value.dtype != np.uint16:  # floats from the device
                value = float_to_bf16(value)
            array = np.ascontiguousarray(value, dtype=numpy_dtype(datatype))
            slot = place(array.nbytes) if place is not None else None
            if slot is None:
                response.raw_output_contents.append(array.tobytes())
            else:
                region, offset, view = slot
                np.frombuffer(view, np.uint8)[:] = array.reshape(-1).view(np.uint8)
                params = tensor.parameters
                params[REGION].string_param = region
                params[OFFSET].int64_param = offset
                params[BYTE_SIZE].int64_param = array.nbytes
                response.raw_output_contents.append(b"")
    return response
