"""The KServe v2 GRPCInferenceService, served on grpc.aio."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from .. import __version__
from ..cache import (
    CacheStats,
)
from ..errors import ConvoyError, InternalError, InvalidInput, Unimplemented
from ..inference.admission import ANONYMOUS
from ..inference.caller import Caller, deadline_in
from ..inference.path import InferencePath
from ..inference.tracing import TRACEPARENT
from ..pb import grpc_service_pb2 as pb
from ..pb import grpc_service_pb2_grpc as pb_grpc
from ..repository.manager import ModelRepository
from ..rollouts.controller import RolloutController
from ..rollouts.policy import AB_KEY_HEADER
from ..statistics import Duration, ModelStatistics
from .auth import Metadata
from .status import status_code

log = logging.getLogger(__name__)

# Requests of one ModelStreamInfer stream between read and written, at most.
STREAM_WINDOW = 64

EXTENSIONS = [
    "classification",
    "model_repository",
    "statistics",
    "binary_tensor_data",
    "schedule_policy",
    "system_shared_memory",
]


async def _abort(context: grpc.aio.ServicerContext, error: ConvoyError) -> None:
    await context.abort(status_code(error), error.message)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The KServe v2 gRPC door: each inference becomes the inference path's request and
    a `Caller` (its client, deadline and A/B header); every other RPC is answered here."""

    def __init__(
        self,
        path: InferencePath,
        load: Callable[[str], Awaitable[None]] | None = None,
        client: Callable[[Metadata], str] = lambda metadata: ANONYMOUS,
    ) -> None:
        self._path = path
        self._repo = path.repository
        self._rollouts = path.rollouts
        self._cache = path.cache
        self._shm = path.shm
        self._cuda_shm = path.cuda_shm
        self._load = load or path.repository.load  # the declared-rollout path where there is one
        # The caller's rate-budget name from its metadata (AccessPolicy.client).
        self._client = client
        self.accepting = False  # flipped by the server's lifecycle

    # -- health and metadata -------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.accepting)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            model = self._repo.get(request.name, request.version)
        except ConvoyError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.accepting and model.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        extensions = EXTENSIONS + (["cuda_shared_memory"] if self._cuda_shm.available else [])
        return pb.ServerMetadataResponse(name="convoy", version=__version__, extensions=extensions)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            model = self._repo.get(request.name, request.version)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        spec = model.spec
        batch = [-1] if spec.batched else []
        versions = [str(m.version) for m in self._repo.versions_of(spec.name)]
        response = pb.ModelMetadataResponse(
            name=spec.name, versions=versions, platform=spec.platform
        )
        for t in spec.inputs:
            response.inputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
        for t in spec.outputs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
        return response

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        try:
            model = self._repo.get(request.name, request.version)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                if request.version:
                    models = [self._repo.get(request.name, request.version)]
                else:
                    self._repo.get(request.name)
                    models = self._repo.versions_of(request.name)
            else:
                if request.version:
                    raise InvalidInput("a statistics request with a version must name the model")
                models = self._repo.ready_models()
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        response = pb.ModelStatisticsResponse()
        for model in models:
            cached = self._cache.stats(model.spec.name, model.version) if self._cache else None
            _fill_statistics(response.model_stats.add(), model.stats, cached)
        return response

    # -- repository ------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for row in self._repo.index(ready_only=request.ready):
            response.models.add(
                name=row.name, version=row.version, state=row.state, reason=row.reason
            )
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        try:
            _no_repository_parameters(request.parameters)
            await self._load(request.model_name)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            _no_repository_parameters(request.parameters, allowed=("unload_dependents",))
            await unload_unless_rolling_out(self._repo, self._rollouts, request.model_name)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        return pb.RepositoryModelUnloadResponse()

    # -- inference ---------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        except Exception as exc:  # a bug must still answer, with INTERNAL, and be logged
            log.exception("ModelInfer for model '%s' failed", request.model_name)
            await _abort(context, InternalError(f"internal error: {exc!r}"))
            raise

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        caller = Caller(
            "grpc",
            self._client(context.invocation_metadata() or ()),
            deadline_in(context.time_remaining()),
            lambda: _header_key(context),
        )
        if self._path.tracing is not None:  # read only while tracing is on
            caller.traceparent = _metadata_value(context, TRACEPARENT)
        return await self._path.infer(request, caller)

    # -- Triton's system shared-memory extension ---------------------------------------

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        try:
            await asyncio.to_thread(
                self._shm.register, request.name, request.key, request.offset, request.byte_size
            )
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        try:
            self._shm.unregister(request.name)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        try:
            regions = self._shm.status(request.name)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            status = response.regions[region.name]
            status.name, status.key = region.name, region.key
            status.offset, status.byte_size = region.offset, region.byte_size
        return response

    # -- Triton's CUDA shared-memory extension ----------------------------------------

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        try:
            await asyncio.to_thread(
                self._cuda_shm.register,
                request.name,
                request.raw_handle,
                request.device_id,
                request.byte_size,
            )
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        try:
            # On the loop: the in-use check and the removal must not interleave with
            # a request taking a lease.
            self._cuda_shm.unregister(request.name)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        return pb.CudaSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        try:
            regions = self._cuda_shm.status(request.name)
        except ConvoyError as exc:
            await _abort(context, exc)
            raise
        response = pb.CudaSharedMemoryStatusResponse()
        for region in regions:
            status = response.regions[region.name]
            status.name, status.device_id = region.name, region.device_id
            status.byte_size = region.byte_size
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests are served concurrently; answers stream back as each completes.

        A failed request answers with error_message and the stream goes on. At most
        STREAM_WINDOW requests of a stream are between read and written: a client that
        writes and never reads stops being read (gRPC flow control then holds it back)
        instead of growing the server. A failure reading the stream ends it with that
        error as its status, after the answers to what was read.
        """
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(STREAM_WINDOW)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | None]
        answers = asyncio.Queue()
        inflight: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, context)
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                if not isinstance(exc, ConvoyError):
                    log.exception("stream request for model '%s' failed", request.model_name)
                    exc = InternalError(f"internal error: {exc!r}")
                failed = pb.ModelStreamInferResponse(error_message=exc.message)
                failed.infer_response.model_name = request.model_name
                failed.infer_response.model_version = request.model_version
                failed.infer_response.id = request.id
                answers.put_nowait(failed)

        async def read() -> None:
            end: BaseException | None = None
            try:
                async for request in request_iterator:
                    await slots.acquire()  # released when its answer has been written
                    task = loop.create_task(answer(request))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
            except Exception as exc:
                end = exc
            if inflight:
                await asyncio.gather(*inflight)
            answers.put_nowait(end)

        # This handler owns the reader and every per-request task: on exit
        # (client gone, server stopping) it cancels whatever is still running.
        reader = loop.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                if isinstance(item, BaseException):
                    log.warning("request stream failed while reading: %r", item)
                    error = item if isinstance(item, ConvoyError) else None
                    code = status_code(error) if error else grpc.StatusCode.INTERNAL
                    await context.abort(code, f"reading the request stream failed: {item!r}")
                    return
                yield item
                slots.release()
        finally:
            reader.cancel()
            for task in list(inflight):
                task.cancel()


def _unimplemented(rpc: str) -> object:
    async def handler(
        self: InferenceServicer, request: object, context: grpc.aio.ServicerContext
    ) -> None:
        await _abort(context, Unimplemented(f"{rpc} is not implemented by Convoy yet"))

    handler.__name__ = rpc
    return handler


# Trace and log settings: answered UNIMPLEMENTED for now.
for _rpc in (
    "TraceSetting",
    "LogSettings",
):
    setattr(InferenceServicer, _rpc, _unimplemented(_rpc))


def _header_key(context: grpc.aio.ServicerContext) -> str | None:
    return _metadata_value(context, AB_KEY_HEADER)


def _metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None


async def unload_unless_rolling_out(
    repository: ModelRepository, rollouts: RolloutController | None, name: str
) -> None:
    """RepositoryModelUnload, over gRPC and HTTP alike: refused while a rollout of the
    model is in progress (its versions would vanish under the analysis)."""
    if rollouts is not None and rollouts.versions_in_use(name):
        for status in rollouts.status(name):
            if status.phase in ("progressing", "paused"):
                raise InvalidInput(
                    f"model '{name}' has a {status.strategy} rollout in progress; "
                    "promote or roll it back before unloading"
                )
    await repository.unload(name)


def _no_repository_parameters(params: object, allowed: tuple[str, ...] = ()) -> None:
    for key in params:  # type: ignore[attr-defined]
        if key not in allowed:
            raise InvalidInput(f"repository parameter '{key}' is not supported by Convoy")


def _copy_duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def _fill_statistics(
    out: pb.ModelStatistics, stats: ModelStatistics, cached: CacheStats | None = None
) -> None:
    out.name = stats.name
    out.version = stats.version
    out.last_inference = stats.last_inference_ms
    out.inference_count = stats.inference_count
    out.execution_count = stats.execution_count
    s = out.inference_stats
    _copy_duration(s.success, stats.success)
    _copy_duration(s.fail, stats.fail)
    _copy_duration(s.queue, stats.queue)
    _copy_duration(s.compute_input, stats.compute_input)
    _copy_duration(s.compute_infer, stats.compute_infer)
    _copy_duration(s.compute_output, stats.compute_output)
    if cached is not None:  # Triton's cache_hit / cache_miss
        _copy_duration(s.cache_hit, cached.hit)
        _copy_duration(s.cache_miss, cached.miss)
    for size in sorted(stats.batch_stats):
        per = stats.batch_stats[size]
        b = out.batch_stats.add(batch_size=size)
        _copy_duration(b.compute_input, per.compute_input)
        _copy_duration(b.compute_infer, per.compute_infer)
        _copy_duration(b.compute_output, per.compute_output)
