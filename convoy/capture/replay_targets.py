"""Where a replay sends its requests: the model repository loaded in this process
(the code `convoy serve` runs, through an InferencePath as the `replay` door) or a live
server over KServe v2 gRPC. Both take the same ModelInferRequest, built from a captured
row with its inputs exactly as captured, and the version named explicitly.

Replay traffic is background work (DESIGN §12): in process, the caller is
Caller("replay", background=True); against a server, the request parameter `background`
queues it behind every caller, and a pacer caps the request rate. RESOURCE_EXHAUSTED and
UNAVAILABLE (a full queue, a model shedding background work) are tried again with a
back-off; other errors are the version's answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..cache import BYPASS_PARAMETER
from ..errors import ConvoyError, Overloaded, Unavailable
from ..inference.codec import BACKGROUND_PARAMETER
from ..pb import grpc_service_pb2 as pb
from ..tensors import (
    CONFIG_TO_WIRE,
    WIRE_DTYPES,
    Array,
    bf16_to_float,
    deserialize_bytes,
    serialize_bytes,
    wire_datatype,
)
from .replay import REPLAY_ID_PREFIX, CapturedRequest
from .replay_report import Answer, Replayed

if TYPE_CHECKING:
    from ..inference.path import InferencePath
    from ..repository.manager import ModelRepository
    from .writer import CaptureCounts, CaptureWriter

RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


@dataclass(frozen=True)
class TargetModel:
    """What a replay needs to know of one served version."""

    name: str
    version: str
    inputs: dict[str, str]  # name -> wire datatype
    required: frozenset[str]  # inputs that are not optional
    outputs: dict[str, str]
    batched: bool
    class_names: dict[str, list[str]] = field(default_factory=dict)  # output -> label file


class Refused(Exception):
    """A request the target did not answer: its status name and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class UnknownVersion(Exception):
    """The named version is not served there (not on disk, not loaded)."""


class Target(Protocol):
    async def describe(self, version: str) -> TargetModel: ...

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse: ...

    async def close(self) -> None: ...


# -- the wire ---------------------------------------------------------------------------------


def to_request(row: CapturedRequest, model: TargetModel) -> pb.ModelInferRequest:
    """The captured inputs, exactly as captured, for the named version; every output."""
    request = pb.ModelInferRequest(
        model_name=model.name, model_version=model.version, id=REPLAY_ID_PREFIX + row.request_id
    )
    request.parameters[BACKGROUND_PARAMETER].bool_param = True
    # A replay measures the version, not the response cache (whose entries the
    # captured request itself may have left behind).
    request.parameters[BYPASS_PARAMETER].bool_param = False
    for name, value in row.inputs.items():
        declared = model.inputs.get(name)
        if declared == "BF16" and value.dtype == np.uint16:
            datatype = "BF16"  # captured as its bit pattern, sent as such
        else:
            datatype = wire_datatype(value.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
        if datatype == "BYTES":
            request.raw_input_contents.append(serialize_bytes(value))
        else:
            request.raw_input_contents.append(
                np.ascontiguousarray(value, dtype=WIRE_DTYPES[datatype]).tobytes()
            )
    return request


def from_response(response: pb.ModelInferResponse) -> dict[str, Array]:
    """Every output as numpy, in the order answered; BF16 as float32."""
    outputs: dict[str, Array] = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(int(d) for d in tensor.shape)
        count = int(np.prod(shape)) if shape else 1
        raw = response.raw_output_contents[i] if i < len(response.raw_output_contents) else None
        if raw is None:
            raise Refused("INTERNAL", f"output '{tensor.name}' came without raw contents")
        if tensor.datatype == "BYTES":
            outputs[tensor.name] = deserialize_bytes(raw, count, tensor.name).reshape(shape)
            continue
        value = np.frombuffer(raw, dtype=WIRE_DTYPES[tensor.datatype]).reshape(shape)
        outputs[tensor.name] = bf16_to_float(value) if tensor.datatype == "BF16" else value
    return outputs


def captured_outputs(row: CapturedRequest, model: TargetModel) -> dict[str, Array]:
    """The captured answer, comparable with a replayed one (BF16 bit patterns as floats)."""
    return {
        name: bf16_to_float(value) if model.outputs.get(name) == "BF16" else value
        for name, value in row.outputs.items()
    }


# -- pacing and retries -------------------------------------------------------------------------


class Pacer:
    """At most `rate` units (requests; a batch job's rows) per second (None: no cap),
    evenly spaced."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0

    async def wait(self, units: float = 1.0) -> None:
        """Until the next `units` may go."""
        if not self._interval:
            return
        now = self._clock()
        if self._next > now:
            await self._sleep(self._next - now)
            now = self._next
        self._next = now + self._interval * units


@dataclass(frozen=True)
class Backoff:
    attempts: int = 8
    first_s: float = 0.1
    most_s: float = 5.0

    def delays(self) -> list[float]:
        return [min(self.most_s, self.first_s * 2**i) for i in range(self.attempts - 1)]


async def send(
    target: Target,
    request: pb.ModelInferRequest,
    pacer: Pacer,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.perf_counter,
) -> Answer:
    """One request, tried again while the target sheds it; its latency is the last try's."""
    delays = backoff.delays()
    while True:
        await pacer.wait()
        start = clock()
        try:
            response = await target.infer(request)
            return Answer(from_response(response), None, clock() - start)
        except Refused as refused:
            if not refused.retryable or not delays:
                return Answer(None, str(refused), clock() - start)
        await sleep(delays.pop(0))


async def replay(
    target: Target,
    rows: Sequence[CapturedRequest],
    candidate: TargetModel,
    baseline: TargetModel,
    pacer: Pacer,
    backoff: Backoff = Backoff(),
    progress: Callable[[int, int], None] | None = None,
) -> list[Replayed]:
    """Each row to both versions, one request at a time, alternating which goes first
    (so neither always meets a cache warmed by the other)."""
    replayed: list[Replayed] = []
    for i, row in enumerate(rows):
        pair = [(candidate, 0), (baseline, 1)]
        answers: list[Answer | None] = [None, None]
        for model, slot in pair if i % 2 == 0 else pair[::-1]:
            answers[slot] = await send(target, to_request(row, model), pacer, backoff)
        cand, base = answers
        assert cand is not None and base is not None
        # The noise floor compares the baseline with its captured answers: as floats.
        request = dataclasses.replace(row, outputs=captured_outputs(row, baseline))
        replayed.append(Replayed(request, cand, base))
        if progress is not None:
            progress(i + 1, len(rows))
    return replayed


# -- in process ---------------------------------------------------------------------------------


class InProcessTarget:
    """The repository loaded here, with the code the server uses; each request through
    an InferencePath as the `replay` door, queued behind every caller."""

    def __init__(
        self,
        repository: ModelRepository,
        path: InferencePath,
        model: str,
        steps_loaded: bool = False,  # a server's repository: its ensembles' steps serve
    ) -> None:
        self.repository = repository
        self.path = path
        self.model = model
        self._steps_loaded = steps_loaded
        self._capture: CaptureWriter | None = None

    async def capture_to(self, uri: str) -> None:
        """Capture what this target answers, as `convoy serve --capture-dir` does (the
        models whose config sets capture_sample_rate), until close. ConfigError naming
        --capture-dir where it cannot be written."""
        from ..config import CaptureConfig
        from ..errors import grpc_code_name
        from .recorder import CaptureRecorder
        from .writer import CaptureWriter

        writer = CaptureWriter(CaptureConfig(uri=uri))
        await asyncio.to_thread(writer.open)
        self._capture = writer  # its thread is running: close stops it, whatever happens
        self.path.observers.append(CaptureRecorder(writer, grpc_code_name))

    @classmethod
    def create(cls, root: Path, model: str) -> InProcessTarget:
        from ..inference.path import InferencePath
        from ..metrics import Metrics
        from ..repository.manager import ModelRepository

        repository = ModelRepository(root, Metrics())
        path = InferencePath(repository)
        repository.steps = path.run_step  # an ensemble's steps take the same path
        return cls(repository, path, model)

    async def load(self, version: str) -> None:
        """Load one version beside the others (whatever the version_policy says).
        UnknownVersion when it is not on disk; ConvoyError when it fails to load."""
        from ..config import ENSEMBLE, read_model_config
        from ..errors import InvalidInput, ModelNotFound

        config = await asyncio.to_thread(read_model_config, self.repository.model_dir(self.model))
        if config.platform == ENSEMBLE and not self._steps_loaded:
            # An ensemble's steps must serve before it loads: each as the server loads it.
            for step in sorted({s.model_name for s in config.ensemble_scheduling.step}):
                await self.repository.load(step)
            self._steps_loaded = True
        try:
            await self.repository.ensure_loaded(self.model, version)
        except (ModelNotFound, InvalidInput) as exc:
            raise UnknownVersion(exc.message) from None

    async def describe(self, version: str) -> TargetModel:
        served = self.repository.get(self.model, version)
        spec = served.spec
        return TargetModel(
            name=self.model,
            version=version,
            inputs={t.name: t.datatype for t in spec.inputs},
            required=frozenset(t.name for t in spec.inputs if not t.optional),
            outputs={t.name: t.datatype for t in spec.outputs},
            batched=spec.batched,
            class_names=dict(served.labels),
        )

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        from ..inference.caller import Caller

        try:
            return await self.path.infer(request, Caller("replay", None, background=True))
        except ConvoyError as exc:
            raise Refused(_status_name(exc), exc.message) from None

    @property
    def captured(self) -> CaptureCounts | None:
        """What capture_to's writer wrote and dropped; None: not capturing."""
        return self._capture.counts if self._capture is not None else None

    async def close(self) -> None:
        try:
            await self.repository.close(30.0)
            self.path.close()
        finally:
            if self._capture is not None:  # every request answered: the buffer is written
                await asyncio.to_thread(self._capture.close, 60.0)


def _status_name(error: ConvoyError) -> str:
    """The gRPC code name a door would answer with, for the retry and the report (the
    mapping itself belongs to the doors: only the retryable ones matter here)."""
    if isinstance(error, Overloaded):
        return "RESOURCE_EXHAUSTED"
    if isinstance(error, Unavailable):
        return "UNAVAILABLE"
    return type(error).__name__


# -- a live server --------------------------------------------------------------------------------


class ServerTarget:
    """A KServe v2 gRPC server: Convoy (which reads the request parameter `background`)
    or another that speaks the protocol."""

    def __init__(
        self,
        address: str,
        model: str,
        token: str | None = None,
        tls_ca: Path | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        import grpc

        from ..pb import grpc_service_pb2_grpc as pb_grpc

        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
            self._channel = grpc.aio.secure_channel(address, credentials, options=_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.model = model
        self.address = address
        self._timeout = timeout_s

    async def model_config(self, version: str) -> Any:
        """The ModelConfig the server reports for a ready version ("": its default);
        UnknownVersion where that version is not ready, Refused where a call failed."""
        import grpc

        try:
            ready = await self._stub.ModelReady(
                pb.ModelReadyRequest(name=self.model, version=version),
                metadata=self._metadata,
                timeout=self._timeout,
            )
            if not ready.ready:
                raise UnknownVersion(
                    f"model '{self.model}' version {version} is not ready on {self.address}"
                )
            reply = await self._stub.ModelConfig(
                pb.ModelConfigRequest(name=self.model, version=version),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise Refused(_code(exc), _details(exc)) from None
        return reply.config

    async def describe(self, version: str) -> TargetModel:
        from ..pb import model_config_pb2 as mc

        config = await self.model_config(version)

        def wire(data_type: int) -> str:
            return CONFIG_TO_WIRE.get(mc.DataType.Name(data_type), "")

        return TargetModel(
            name=self.model,
            version=version,
            inputs={t.name: wire(t.data_type) for t in config.input},
            required=frozenset(t.name for t in config.input if not t.optional),
            outputs={t.name: wire(t.data_type) for t in config.output},
            batched=config.max_batch_size > 0,
        )

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        import grpc

        try:
            response: pb.ModelInferResponse = await self._stub.ModelInfer(
                request, metadata=self._metadata, timeout=self._timeout
            )
            return response
        except grpc.RpcError as exc:
            raise Refused(_code(exc), _details(exc)) from None

    async def close(self) -> None:
        await self._channel.close()


_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]


def _code(exc: Any) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return code.name if code is not None else "UNKNOWN"


def _details(exc: Any) -> str:
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    return str(details or exc)
