"""Where a batch job's rows are scored: the model loaded in this process with the code
`convoy serve` runs (through an InferencePath as the `batch` door), or a live server over
KServe v2 gRPC. Both take the same ModelInferRequest, so both decode, validate and answer
a row exactly as an online request (DESIGN §13).

Batch rows are background work (DESIGN §12): in process, the caller is
Caller("batch", background=True); against a server, the request parameter `background`
queues them behind every online caller. RESOURCE_EXHAUSTED and UNAVAILABLE (a full
queue, a model shedding background work) are tried again with an exponential back-off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..capture.replay_targets import (
    Backoff,
    InProcessTarget,
    Pacer,
    Refused,
    ServerTarget,
    UnknownVersion,
    from_response,
)
from ..config import TensorSpec
from ..errors import ConvoyError
from ..inference.codec import BACKGROUND_PARAMETER
from ..pb import grpc_service_pb2 as pb
from ..tensors import CONFIG_TO_WIRE, WIRE_DTYPES, Array, float_to_bf16, serialize_bytes

if TYPE_CHECKING:
    from ..repository.manager import ModelRepository

# A row's own fault (a value the model refuses, the model failing on it): bisected to
# the row, which goes to the dead letters. Anything else stops the job.
ROW_ERRORS = frozenset({"INVALID_ARGUMENT", "INTERNAL", "UNKNOWN"})
# A batch job waits out a busy server longer than a replay: it has nowhere else to go.
BATCH_BACKOFF = Backoff(attempts=12, first_s=0.05, most_s=10.0)


@dataclass(frozen=True)
class ModelSignature:
    """What a batch job needs to know of the version that scores it."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0: the model takes no batch dimension
    instances: int

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


class JobFailed(Exception):
    """The job cannot go on (the model is gone, the server refuses every try)."""


class NoSuchVersion(JobFailed):
    """--version names a version that is not there: a usage error."""


class Scorer:
    """Sends one batch of rows and returns its outputs; retries what is only busy."""

    def __init__(
        self,
        target: InProcessTarget | ServerTarget,
        signature: ModelSignature,
        backoff: Backoff = BATCH_BACKOFF,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        pacer: Pacer | None = None,
    ) -> None:
        self.target = target
        self.signature = signature
        self._backoff = backoff
        self._sleep = sleep
        self.pacer = pacer  # --rate: rows per second, evenly spaced
        self.retries = 0  # busy answers tried again (the summary reports them)

    async def score(self, inputs: dict[str, Array], request_id: str) -> dict[str, Array]:
        """Outputs of one batch; Refused with a row error code for the rows' own fault,
        JobFailed for anything else."""
        request = to_request(self.signature, inputs, request_id)
        if self.pacer is not None:
            await self.pacer.wait(_batch_rows(inputs) if self.signature.max_batch_size else 1)
        delays = self._backoff.delays()
        while True:
            try:
                return from_response(await self.target.infer(request))
            except Refused as refused:
                if refused.code in ROW_ERRORS:
                    raise
                if not refused.retryable:
                    raise JobFailed(str(refused)) from None
                if not delays:
                    raise JobFailed(f"{refused} (after {self._backoff.attempts} tries)") from None
            self.retries += 1
            await self._sleep(delays.pop(0))

    async def close(self) -> None:
        await self.target.close()


def _batch_rows(inputs: dict[str, Array]) -> int:
    """The rows of one request of a batching model: its inputs' first dimension."""
    value = next(iter(inputs.values()), None)
    return int(value.shape[0]) if value is not None and value.ndim else 1


def to_request(
    signature: ModelSignature, inputs: dict[str, Array], request_id: str
) -> pb.ModelInferRequest:
    """One ModelInferRequest for the named version, every output asked for."""
    request = pb.ModelInferRequest(
        model_name=signature.name, model_version=signature.version, id=request_id
    )
    request.parameters[BACKGROUND_PARAMETER].bool_param = True
    for spec in signature.inputs:
        value = inputs.get(spec.name)
        if value is None:
            continue
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(value.shape))
        if spec.datatype == "BYTES":
            request.raw_input_contents.append(serialize_bytes(value))
        elif spec.datatype == "BF16" and value.dtype != np.uint16:
            request.raw_input_contents.append(float_to_bf16(value).tobytes())
        else:
            request.raw_input_contents.append(
                np.ascontiguousarray(value, dtype=WIRE_DTYPES[spec.datatype]).tobytes()
            )
    return request


# -- in process ---------------------------------------------------------------------------------


class BatchInProcessTarget(InProcessTarget):
    """The repository loaded here (replay's in-process target), as the `batch` door."""

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        from ..errors import grpc_code_name
        from ..inference.caller import Caller

        try:
            return await self.path.infer(request, Caller("batch", None, background=True))
        except ConvoyError as exc:  # the code a server would answer: as with --server
            raise Refused(grpc_code_name(exc), exc.message) from None


async def open_in_process(
    root: Path, model: str, version: str, capture_dir: str | None = None
) -> tuple[Scorer, ModelSignature]:
    """Load the model as `convoy serve` does (the named version beside the others, or
    the default one). JobFailed naming --version or the model when it is not there.
    With capture_dir, what is scored is captured there as the `batch` door (ConfigError
    naming --capture-dir where it cannot be written)."""
    target = BatchInProcessTarget.create(root, model)
    try:
        if capture_dir is not None:
            await target.capture_to(capture_dir)
        try:
            if version:
                await target.load(version)
            else:
                await target.repository.load(model)
        except UnknownVersion as exc:
            raise NoSuchVersion(f"--version {version}: {exc}") from None
        except ConvoyError as exc:
            raise JobFailed(f"model '{model}' did not load: {exc.message}") from None
        served = target.repository.get(model, version)
        signature = _signature_of(target.repository, model, str(served.version))
    except BaseException:
        await target.close()
        raise
    return Scorer(target, signature), signature


def _signature_of(repository: ModelRepository, model: str, version: str) -> ModelSignature:
    served = repository.get(model, version)
    spec = served.spec
    pool = getattr(served, "pool", None)
    return ModelSignature(
        name=model,
        version=version,
        inputs=tuple(spec.inputs),
        outputs=tuple(spec.outputs),
        max_batch_size=spec.max_batch_size if spec.batched else 0,
        instances=len(pool.instances) if pool is not None else 1,
    )


# -- a live server --------------------------------------------------------------------------------


async def _server_config(target: ServerTarget, version: str) -> Any:
    """The server's ModelConfig of the model; NoSuchVersion for a --version that is not
    ready there, JobFailed for a model that is not, or a call that failed."""
    try:
        return await target.model_config(version)
    except UnknownVersion:
        if version:
            raise NoSuchVersion(
                f"--version {version}: model '{target.model}' version {version} is not "
                f"ready on {target.address}"
            ) from None
        raise JobFailed(f"model '{target.model}' is not ready on {target.address}") from None
    except Refused as exc:
        raise JobFailed(f"--server {target.address}: {exc}") from None


async def open_server(
    address: str, model: str, version: str, token: str | None = None, tls_ca: Path | None = None
) -> tuple[Scorer, ModelSignature]:
    """A KServe v2 gRPC server; the model's inputs, outputs and instances from its config."""
    from ..pb import model_config_pb2 as mc

    target = ServerTarget(address, model, token, tls_ca)
    try:
        config = await _server_config(target, version)

        def tensors(entries: Any) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(
                    t.name,
                    CONFIG_TO_WIRE.get(mc.DataType.Name(t.data_type), ""),
                    tuple(int(d) for d in t.dims),
                    bool(getattr(t, "optional", False)),
                )
                for t in entries
            )

        signature = ModelSignature(
            name=model,
            version=version,
            inputs=tensors(config.input),
            outputs=tensors(config.output),
            max_batch_size=max(0, config.max_batch_size),
            instances=sum(max(1, g.count) for g in config.instance_group) or 1,
        )
    except BaseException:
        await target.close()
        raise
    return Scorer(target, signature), signature
