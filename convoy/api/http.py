"""KServe v2 HTTP/REST, as Triton serves it, on aiohttp.

Every inference request becomes the pb.ModelInferRequest a gRPC client would
have sent (JSON data and binary tensor data both as raw_input_contents) and
goes through the same decode_request, so validation and its messages are the
gRPC path's. Answers come back through encode_response and are then written as
JSON or as Triton's binary tensor data extension.

Errors answer {"error": message} with the status Triton's HttpCodeFromError
gives the matching TRITONSERVER_Error code (INVALID_ARG 400, NOT_FOUND 404,
UNAVAILABLE 503, UNSUPPORTED 501, INTERNAL 500). Bodies are read only up to
max_body_bytes (413 beyond), and no buffer is allocated from a size the client
declares before it is checked against the bytes actually received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from .. import __version__
from ..errors import (
    ConfigError,
    ConvoyError,
    InvalidInput,
    Unimplemented,
)
from ..inference.admission import ANONYMOUS
from ..inference.caller import Caller
from ..inference.path import InferencePath
from ..inference.tracing import TRACEPARENT
from ..pb import grpc_service_pb2 as pb
from ..rollouts.policy import AB_KEY_HEADER
from ..tensors import (
    NUMPY_DTYPES,
    WIRE_DTYPES,
    bf16_to_float,
    deserialize_bytes,
    float_to_bf16,
    serialize_bytes,
)
from ..tritonjson import message_to_dict
from .auth import AccessPolicy, Metadata
from .servicer import EXTENSIONS, _fill_statistics, unload_unless_rolling_out
from .status import http_status

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
# Bodies (and answers) larger than this are parsed (written) on a worker thread.
_INLINE_BYTES = 256 << 10
# Triton's default --http-max-input-size: 64 MiB.
DEFAULT_MAX_BODY_BYTES = 1 << 26

# What an AccessPolicy denial answers over HTTP (Triton has no rate limit; 429 is HTTP's).
_DENIAL_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}

_RPC = "/inference.GRPCInferenceService/"
_COMPRESSIBLE = frozenset({"gzip", "deflate"})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def server_ssl_context(
    cert: Path | None, key: Path | None, ca: Path | None = None
) -> ssl.SSLContext | None:
    """The TLS context for the HTTP port from the gRPC port's files (None: plain HTTP);
    with a CA, clients must present a certificate it signed (mutual TLS)."""
    if cert is None and key is None:
        if ca is not None:
            raise ConfigError("--tls-ca", "tls", "mutual TLS needs --tls-cert and --tls-key too")
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert/--tls-key", "tls", "give both the certificate and the key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpFrontend:
    """The HTTP/REST door: each inference becomes the inference path's request (the
    pb.ModelInferRequest a gRPC client would have sent) and a `Caller`.

    `ready` says whether the server accepts work (the servicer's `accepting`);
    `load` is the load path (declared rollouts' where there is one).
    """

    def __init__(
        self,
        path: InferencePath,
        policy: AccessPolicy | None = None,
        *,
        load: Callable[[str], Awaitable[None]] | None = None,
        ready: Callable[[], bool] = lambda: True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self._path = path
        self._repo = path.repository
        self._rollouts = path.rollouts
        self._policy = policy if policy is not None and policy.active else None
        self._load = load or path.repository.load
        self._ready = ready
        self._max_body = max_body_bytes
        self._shutdown_timeout = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._rpc_of: dict[tuple[str, str], str] = {}
        self.port = 0
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[self._middleware])
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], str]]
        routes = [
            ("GET", "/v2/health/live", self._live, "ServerLive"),
            ("GET", "/v2/health/ready", self._server_ready, "ServerReady"),
            ("GET", "/v2", self._server_metadata, "ServerMetadata"),
            ("GET", "/v2/models/stats", self._stats, "ModelStatistics"),
            ("POST", "/v2/repository/index", self._index, "RepositoryIndex"),
            ("POST", "/v2/repository/models/{name}/load", self._load_model, "RepositoryModelLoad"),
            (
                "POST",
                "/v2/repository/models/{name}/unload",
                self._unload_model,
                "RepositoryModelUnload",
            ),
        ]
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                ("GET", base, self._model_metadata, "ModelMetadata"),
                ("GET", base + "/ready", self._model_ready, "ModelReady"),
                ("GET", base + "/config", self._model_config, "ModelConfig"),
                ("GET", base + "/stats", self._stats, "ModelStatistics"),
                ("POST", base + "/infer", self._infer, "ModelInfer"),
            ]
        # Triton's other extensions: named refusals (as gRPC's UNIMPLEMENTED), not 404s.
        for path in (
            "/v2/systemsharedmemory{tail:.*}",
            "/v2/cudasharedmemory{tail:.*}",
            "/v2/trace/setting",
            "/v2/models/{name}/trace/setting",
            "/v2/logging",
        ):
            app.router.add_route("*", path, self._unimplemented)
        for method, path, handler, rpc in routes:
            app.router.add_route(method, path, handler)
            self._rpc_of[(method, path)] = _RPC + rpc
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Bind and serve; returns the port (useful with port 0)."""
        # access_log=None: no per-request log line on the hot path.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = _bound_port(runner, port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting connections; requests in flight get shutdown_timeout_s."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- cross-cutting: auth and error mapping -------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route
        rpc = self._rpc_of.get((route.method, route.resource.canonical if route.resource else ""))
        if rpc is not None and self._policy is not None:
            # Checked before the body is read: a refused client costs no buffer.
            denial = self._policy.check(rpc, _metadata(request))
            if denial is not None:
                status = _DENIAL_STATUS.get(denial.code, 403)
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return _error(status, denial.message, headers)
        try:
            return await handler(request)
        except ConvoyError as exc:
            return _error(http_status(exc), exc.message)
        except web.HTTPException as exc:
            # aiohttp's own refusals (413 body too large, 404/405 routing) in Triton's shape.
            if exc.status < 400:
                raise
            return _error(
                exc.status,
                exc.reason,
                {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
            )
        except Exception as exc:  # a bug must still answer, with 500, and be logged
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, f"internal error: {exc!r}")

    async def _unimplemented(self, request: web.Request) -> web.Response:
        raise Unimplemented(
            f"{request.path} is not implemented by Convoy's HTTP endpoint"
            + (
                "; system shared memory is served over gRPC"
                if "sharedmemory" in request.path
                else ""
            )
        )

    # -- health and metadata ---------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _server_ready(self, request: web.Request) -> web.Response:
        # Triton answers 400, not 503, for "not ready".
        return web.Response(status=200 if self._ready() else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "convoy", "version": __version__, "extensions": EXTENSIONS}
        )

    async def _model_metadata(self, request: web.Request) -> web.Response:
        spec = self._repo.get(*_name_version(request)).spec
        batch = [-1] if spec.batched else []
        return web.json_response(
            {
                "name": spec.name,
                "versions": [str(m.version) for m in self._repo.versions_of(spec.name)],
                "platform": spec.platform,
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)}
                    for t in spec.inputs
                ],
                "outputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)}
                    for t in spec.outputs
                ],
            }
        )

    async def _model_ready(self, request: web.Request) -> web.Response:
        try:
            model = self._repo.get(*_name_version(request))
        except ConvoyError:
            return web.Response(status=400)
        return web.Response(status=200 if self._ready() and model.ready else 400)

    async def _model_config(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_dict(self._repo.get(*_name_version(request)).config))

    async def _stats(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        version = request.match_info.get("version", "")
        if name and version:
            models = [self._repo.get(name, version)]
        elif name:
            self._repo.get(name)
            models = self._repo.versions_of(name)
        else:
            models = self._repo.ready_models()
        cache = self._path.cache
        response = pb.ModelStatisticsResponse()
        for model in models:
            cached = cache.stats(model.spec.name, model.version) if cache else None
            _fill_statistics(response.model_stats.add(), model.stats, cached)
        return web.json_response(message_to_dict(response))

    # -- repository ----------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be a boolean")
        rows = self._repo.index(ready_only=ready)
        return web.json_response(
            [
                {"name": r.name, "version": r.version, "state": r.state, "reason": r.reason}
                for r in rows
            ]
        )

    async def _load_model(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        _no_repository_parameters(body)
        await self._load(request.match_info["name"])
        return web.Response(status=200)

    async def _unload_model(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        _no_repository_parameters(body, allowed=("unload_dependents",))
        await unload_unless_rolling_out(self._repo, self._rollouts, request.match_info["name"])
        return web.Response(status=200)

    # -- inference -------------------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > self._max_body:
            # Refused from the header alone: nothing of the body is read.
            return _error(
                413,
                f"request body of {request.content_length} bytes is over the server's "
                f"limit of {self._max_body}",
            )
        body = await request.read()
        name, version = _name_version(request)
        declared = request.headers.get(HEADER_LENGTH)
        if len(body) <= _INLINE_BYTES:
            infer_request, binary_outputs = _read_request(body, declared, name, version)
        else:  # parsing megabytes of JSON would hold up every other request on the loop
            infer_request, binary_outputs = await asyncio.to_thread(
                _read_request, body, declared, name, version
            )
        caller = Caller(
            "http",
            self._policy.client(_metadata(request)) if self._policy is not None else ANONYMOUS,
            None,  # HTTP carries no deadline; the "timeout" parameter does
            lambda: request.headers.get(AB_KEY_HEADER),
        )
        if self._path.tracing is not None:  # read only while tracing is on
            caller.traceparent = request.headers.get(TRACEPARENT)
        response = await self._path.infer(infer_request, caller)
        if sum(len(raw) for raw in response.raw_output_contents) <= _INLINE_BYTES:
            answer = _from_pb(response, binary_outputs)
        else:
            answer = await asyncio.to_thread(_from_pb, response, binary_outputs)
        accepted = request.headers.get("Accept-Encoding", "")
        if _COMPRESSIBLE.intersection(p.split(";")[0].strip() for p in accepted.split(",")):
            # Asked for (tritonclient's response_compression_algorithm), as Triton does;
            # the header length stays that of the uncompressed JSON, as in Triton.
            answer.enable_compression()
        return answer


def _metadata(request: web.Request) -> Metadata:
    """The request's credentials as gRPC metadata, for the access policy."""
    auth = request.headers.get("Authorization")
    return (("authorization", auth),) if auth is not None else ()


def _name_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked


async def _json_body(request: web.Request) -> dict[str, Any]:
    """An optional JSON object body (repository calls)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    parsed = _parse_json(raw)
    return parsed


def _no_repository_parameters(body: Mapping[str, Any], allowed: tuple[str, ...] = ()) -> None:
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    for key in params:
        if key not in allowed:
            raise InvalidInput(f"repository parameter '{key}' is not supported by Convoy")


# -- request: JSON + binary -> pb ---------------------------------------------------------


def _read_request(
    body: bytes, declared: str | None, name: str, version: str
) -> tuple[pb.ModelInferRequest, dict[str, bool]]:
    header, binary = _split_body(body, declared)
    return _to_pb(_parse_json(header), binary, name, version)


def _split_body(body: bytes, declared: str | None) -> tuple[bytes, memoryview]:
    if declared is None:
        return body, memoryview(b"")
    try:
        length = int(declared)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} '{declared[:40]}' is not an integer") from None
    if length < 0 or length > len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} {length} is outside the request body of {len(body)} bytes"
        )
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInput(f"the request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("the request body must be a JSON object")
    return parsed


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _to_pb(
    body: Mapping[str, Any], binary: memoryview, name: str, version: str
) -> tuple[pb.ModelInferRequest, dict[str, bool]]:
    """The request as gRPC would carry it, and per requested output whether it is
    answered as binary data ('' for outputs not named: binary_data_output)."""
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    request.id = request_id
    params = _object(body.get("parameters"), "parameters")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameter 'binary_data_output' must be a boolean")
    for key, value in params.items():
        if key != "binary_data_output":
            _set_parameter(request.parameters[key], key, value)
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput("'inputs' must be a JSON array of input tensors")
    offset = 0
    for index, tensor in enumerate(inputs):
        offset = _add_input(request, tensor, index, binary, offset)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size"
        )
    binary_outputs: dict[str, bool] = {"": binary_default}
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a JSON array")
    for index, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput(f"outputs[{index}] must be an object with a string 'name'")
        wanted = request.outputs.add(name=out["name"])
        out_params = _object(out.get("parameters"), f"output '{out['name']}'.parameters")
        if "shared_memory_region" in out_params:
            raise Unimplemented(_NO_SHM)
        as_binary = out_params.get("binary_data", binary_default)
        if not isinstance(as_binary, bool):
            raise InvalidInput(f"output '{out['name']}': 'binary_data' must be a boolean")
        binary_outputs[out["name"]] = as_binary
        for key, value in out_params.items():
            if key != "binary_data":
                _set_parameter(wanted.parameters[key], f"output '{out['name']}'.{key}", value)
    return request, binary_outputs


def _object(value: object, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'{field}' must be a JSON object")
    return value


def _set_parameter(target: pb.InferParameter, field: str, value: object) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise InvalidInput(f"parameter '{field}' {value} does not fit 64 bits")
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidInput(f"parameter '{field}' must be a boolean, number or string")


def _add_input(
    request: pb.ModelInferRequest, tensor: object, index: int, binary: memoryview, offset: int
) -> int:
    if not isinstance(tensor, dict):
        raise InvalidInput(f"inputs[{index}] must be a JSON object")
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput(f"inputs[{index}] needs a string 'name' and 'datatype'")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 63 for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be an array of non-negative integers")
    params = _object(tensor.get("parameters"), f"input '{name}'.parameters")
    if "shared_memory_region" in params:
        raise Unimplemented(_NO_SHM)
    size = params.get("binary_data_size")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInput(f"input '{name}': 'binary_data_size' must be a non-negative integer")
        if "data" in tensor:
            raise InvalidInput(f"input '{name}': give 'data' or 'binary_data_size', not both")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} reaches past the end of the "
                f"binary data ({len(binary) - offset} bytes left)"
            )
        dtype = WIRE_DTYPES.get(datatype)
        if dtype is not None and size != math.prod(shape) * dtype.itemsize:
            # Said here in HTTP's terms; decode_request would name raw_input_contents.
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} does not fit shape {shape} of "
                f"{datatype} ({math.prod(shape) * dtype.itemsize} bytes)"
            )
        # One copy into the message: protobuf bytes fields take no views.
        request.raw_input_contents.append(bytes(binary[offset : offset + size]))
        return offset + size
    if "data" not in tensor:
        raise InvalidInput(f"input '{name}': no 'data' and no 'binary_data_size'")
    request.raw_input_contents.append(_json_data(name, datatype, shape, tensor["data"]))
    return offset


_NO_SHM = (
    "shared memory regions are not supported over HTTP by Convoy; use gRPC, or send the "
    "tensor as binary data"
)
_INTEGER_TYPES = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)


def _json_data(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    """JSON 'data' (flat or nested, row-major) as the raw little-endian bytes of
    raw_input_contents, so decode_request checks it as it checks gRPC's."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input '{name}': datatype '{datatype}' cannot be sent as JSON data; "
            "send it as binary data"
        )
    flat = _flatten(data, name)
    needed = math.prod(shape)
    if len(flat) != needed:
        raise InvalidInput(
            f"input '{name}': 'data' holds {len(flat)} elements; shape {shape} needs {needed}"
        )
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise InvalidInput(f"input '{name}': BYTES data must be strings")
        array = np.empty(len(flat), dtype=np.object_)
        array[:] = [x.encode("utf-8") for x in flat]
        return serialize_bytes(array)
    if datatype == "BOOL":
        ok = all(type(x) is bool for x in flat)
    elif datatype in _INTEGER_TYPES:
        ok = all(type(x) is int for x in flat)
    else:
        ok = all(type(x) is int or type(x) is float for x in flat)
    if not ok:
        raise InvalidInput(f"input '{name}': 'data' holds values that are not {datatype}")
    try:
        if datatype == "BF16":
            # JSON carries BF16 as numbers (the server holds their bit patterns):
            # float32 first, then nearest even, as torch's .to(torch.bfloat16) rounds.
            floats = np.asarray(flat, dtype=np.float32)
            return float_to_bf16(floats).astype("<u2", copy=False).tobytes()
        return np.asarray(flat, dtype=dtype.newbyteorder("<")).tobytes()
    except OverflowError:
        raise InvalidInput(f"input '{name}': a value does not fit {datatype}") from None


def _flatten(data: object, name: str) -> list[Any]:
    """Leaves of nested JSON arrays in row-major order; iterative, so no depth limit
    a client could reach for."""
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a JSON array")
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if isinstance(item, dict):
                raise InvalidInput(f"input '{name}': 'data' may hold only arrays and values")
            flat.append(item)
        else:
            stack.pop()
    return flat


# -- response: pb -> JSON + binary ---------------------------------------------------------


def _from_pb(response: pb.ModelInferResponse, binary_outputs: Mapping[str, bool]) -> web.Response:
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    default = binary_outputs.get("", False)
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary_outputs.get(tensor.name, default):
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = _json_values(tensor.name, tensor.datatype, list(tensor.shape), raw)
        outputs.append(out)
    header = json.dumps(
        {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "id": response.id,
            "outputs": outputs,
        }
    ).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=b"".join([header, *chunks]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def _json_values(name: str, datatype: str, shape: list[int], raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        items = deserialize_bytes(raw, math.prod(shape), f"output '{name}'")
        try:
            return [bytes(item).decode("utf-8") for item in items]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output '{name}' holds bytes that are not UTF-8 text and cannot be "
                "written as JSON; ask for it with binary_data"
            ) from None
    dtype = NUMPY_DTYPES[datatype].newbyteorder("<")
    array = np.frombuffer(raw, dtype=dtype)
    if datatype == "BF16":  # numbers in JSON, not the bit patterns the server holds
        array = bf16_to_float(array)
    values: list[Any] = array.tolist()
    return values
