"""One front-end process: gRPC on the shared port, the engine behind it.

Started by the engine's FrontendSupervisor with the "spawn" method (a fresh
interpreter: gRPC must not be forked). ModelInfer goes to the engine over ZeroMQ as
raw bytes; every other RPC (metadata, statistics, repository, health, our admin
services, reflection, streams) is proxied, raw bytes again, to the engine's gRPC
server on its Unix socket. The front end holds no model state: it can die and be
restarted, and it exits when its engine is gone.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from ..api.auth import AccessInterceptor, AccessPolicy, Metadata, load_tokens
from ..heap import GcPauses, settle
from ..inference.admission import DRAIN_SETTLE_MAX_S, Draining
from ..pb import grpc_service_pb2 as pb
from .loopsocket import LoopSocket
from .outbox import Outbox
from .ring import INLINE_BELOW, FrontendRing, Segment
from .wire import (
    CANCEL,
    FREE,
    HELLO,
    OK,
    PLACED,
    REPORT,
    RING_INPUTS,
    RING_OUTPUTS,
    Triple,
    deliver,
    encode_header,
    peer_identity,
    status_code,
)

log = logging.getLogger(__name__)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT_INTERVAL_S = 2.0  # how often a front end's own figures reach the engine
_AB_KEY_HEADER = "convoy-ab-key"
_TRACEPARENT = "traceparent"  # forwarded: the engine decides whether it is traced


@dataclass(frozen=True)
class FrontendSettings:
    """Everything a front end needs, picklable for the spawn start method."""

    host: str
    port: int
    engine_grpc: str  # unix socket path of the engine's gRPC server
    engine_infer: str  # ZeroMQ address of the engine's EngineLink
    engine_pid: int
    grace_period_s: float
    max_message_bytes: int
    max_connection_age_ms: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    auth_tokens: Path | None = None
    log_level: str = "INFO"
    ring_bytes: int = 8 << 20  # each half of the shared-memory segment; 0: none
    freeze_heap: bool = True  # see heap.py


def run_frontend(settings: FrontendSettings, index: int, ready: Any) -> None:
    """Process entry point: serve until SIGTERM (drain) or until the engine is gone."""
    import uvloop

    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s frontend-{index} %(name)s: %(message)s",
    )
    uvloop.run(_serve(settings, index, ready))


async def _serve(settings: FrontendSettings, index: int, ready: Any) -> None:
    import zmq

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    limits = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    channel = grpc.aio.insecure_channel(f"unix:{settings.engine_grpc}", options=limits)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, peer_identity(index, os.getpid()))
    # No high-water mark: every request and answer must arrive (a DEALER at its mark
    # would only wait, but the engine's ROUTER would drop; both sides alike).
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(settings.engine_infer)
    policy = _policy(settings)
    link = _InferLink(dealer, policy.client)
    link.start()
    pauses = GcPauses(CollectorRegistry())  # exported by the engine, from our reports
    pauses.start()
    reporter = loop.create_task(_report(link, pauses))
    watcher = loop.create_task(_watch_engine(settings.engine_pid, stop, link))
    await link.offer_segment(settings.ring_bytes)
    if link.lost is None:  # the engine may have died while we started: never listen then
        await _listen(settings, policy, ready, stop, channel, link, limits)
    for task in (watcher, reporter):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    pauses.close()
    link.close()  # and its socket
    context.term()
    await channel.close()


async def _listen(
    settings: FrontendSettings,
    policy: AccessPolicy,
    ready: Any,
    stop: asyncio.Event,
    channel: grpc.aio.Channel,
    link: _InferLink,
    limits: list[tuple[str, int]],
) -> None:
    """Listen on the shared port until told to stop, then drain."""
    interceptors = [AccessInterceptor(policy)] if policy.active else []
    server = grpc.aio.server(options=_server_options(settings, limits), interceptors=interceptors)
    server.add_generic_rpc_handlers([_Proxy(channel, link)])
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    bound = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if bound == 0:
        raise OSError(f"front end cannot bind {address}")
    await server.start()
    if settings.freeze_heap:
        settle()  # what start-up made, out of every full collection while serving
    ready.set()
    await stop.wait()
    # New calls are refused (UNAVAILABLE) until callers stop coming: what the server's
    # stop would find received but not started, it would cancel (CANCELLED, never retried).
    link.draining.start()
    if link.lost is None:
        await link.draining.settle(min(DRAIN_SETTLE_MAX_S, settings.grace_period_s / 2))
    # Drain: in-flight calls finish through the engine, which stops after its front ends;
    # with the engine gone they have already failed, and there is nothing to wait for.
    await server.stop(0 if link.lost is not None else settings.grace_period_s)


async def _report(link: _InferLink, pauses: GcPauses) -> None:
    """This process's garbage-collection pauses to the engine, which exports them
    (convoy_frontend_gc_pause_seconds): cumulative, and sent only when they changed."""
    last = b""
    while True:
        try:
            report = json.dumps({"gc": pauses.snapshot()}).encode()
            if report != last:
                link.report(report)
                last = report
        except Exception:  # figures are not worth a front end: serving goes on
            log.exception("front end: reporting to the engine failed")
        await asyncio.sleep(REPORT_INTERVAL_S)


async def _watch_engine(engine_pid: int, stop: asyncio.Event, link: _InferLink) -> None:
    """The engine gone (this process re-parented), nothing can be served: the calls
    waiting on it fail now (UNAVAILABLE, which clients may retry), and we stop."""
    while os.getppid() == engine_pid:  # noqa: ASYNC110 (no event announces a parent's death)
        await asyncio.sleep(0.5)
    log.error("engine (pid %d) is gone: stopping", engine_pid)
    link.lose(ConnectionError(f"the engine (pid {engine_pid}) is gone"))
    stop.set()


def _server_options(
    settings: FrontendSettings, limits: list[tuple[str, int]]
) -> list[tuple[str, int]]:
    options = [*limits, ("grpc.so_reuseport", 1)]  # N front ends share the port
    if settings.max_connection_age_ms > 0:
        options += [
            ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
        ]
    return options


def _policy(settings: FrontendSettings) -> AccessPolicy:
    """Tokens and roles, checked here on the caller's own connection. No rate budget:
    the engine charges every front end's callers to its one budget (by the client name
    each request's header carries, and on the engine's socket for the other RPCs)."""
    tokens = load_tokens(settings.auth_tokens) if settings.auth_tokens else None
    return AccessPolicy(tokens)


def _credentials(settings: FrontendSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ca = settings.tls_ca.read_bytes() if settings.tls_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class _InferLink:
    """ModelInfer to the engine: one DEALER socket, replies matched by request id; the
    requests of one loop turn go in one message (Outbox). Large requests' tensors go
    through the shared-memory segment, and large outputs come back through it."""

    def __init__(self, socket: Any, client: Callable[[Metadata], str]) -> None:
        self._socket = LoopSocket(socket, self._received)
        self._client = client  # a caller's rate-budget name, from its metadata
        self._ids = itertools.count()
        self._pending: dict[bytes, asyncio.Future[tuple[bytes, bytes]]] = {}
        self._outbox = Outbox(self._socket.send, self._not_sent)
        self._ring: FrontendRing | None = None
        # Input slots per request id: freed when the engine answers (it may still read
        # them after the caller has gone), whoever is still waiting for the answer.
        self._staged: dict[bytes, list[int]] = {}
        self.lost: ConnectionError | None = None  # the engine is gone: no answer will come
        self.draining = Draining()  # on from SIGTERM: new calls UNAVAILABLE

    def lose(self, error: ConnectionError) -> None:
        """Fail every call waiting for the engine, and every later one."""
        self.lost = error
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def offer_segment(self, half: int) -> None:
        """Create the segment and hand it to the engine; without it (no room in
        /dev/shm, an engine that refuses it) every tensor travels inline."""
        if half <= 0:
            return
        try:
            segment = Segment.create(half)
        except OSError as exc:
            log.warning("no shared memory for tensors (%s): they travel inline", exc)
            return
        rid = next(self._ids).to_bytes(8, "little")
        future: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        body = f"{os.getpid()}:{segment.name}".encode()
        self._outbox.put(None, (rid, encode_header(None, None, kind=HELLO), body))
        try:
            status, message = await asyncio.wait_for(future, 30)
        except (TimeoutError, ConnectionError) as exc:
            status, message = b"\x0d", repr(exc).encode()
        finally:
            self._pending.pop(rid, None)
        if status[0] != OK:
            log.warning("engine refused shared memory (%s): tensors travel inline", message)
            segment.unlink()
            segment.close()
            return
        self._ring = FrontendRing(segment)

    def start(self) -> None:
        self._socket.start()

    def report(self, body: bytes) -> None:
        self._outbox.put(None, (b"", encode_header(None, None, kind=REPORT), body))

    def _received(self, frames: list[bytes]) -> None:
        deliver(frames, self._answered, "engine")

    def _answered(self, rid: bytes, status: bytes, body: bytes) -> None:
        ring = self._ring
        staged = self._staged.pop(rid, None)
        if staged is not None and ring is not None:
            ring.release(staged)
        if ring is not None and status[0] == OK and len(status) > 1 and status[1] == PLACED:
            body, offsets = ring.reply(body)  # copied out: the engine may reuse the slots
            self._outbox.put(None, (b"", encode_header(None, None, kind=FREE), _int64s(offsets)))
        future = self._pending.pop(rid, None)
        if future is not None and not future.done():
            future.set_result((status, body))

    def _not_sent(self, items: list[Triple], exc: BaseException) -> None:
        for rid, _, _ in items:
            staged = self._staged.pop(rid, None)
            if staged is not None and self._ring is not None:
                self._ring.release(staged)
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_exception(ConnectionError(f"engine unreachable: {exc!r}"))

    async def infer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.lost is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(self.lost))
        if self.draining.on:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.draining.refuse().message)
        rid = next(self._ids).to_bytes(8, "little")
        flags = 0
        if self._ring is not None:
            flags = RING_OUTPUTS
            if len(payload) >= INLINE_BELOW:
                payload, staged = self._stage(payload)
                if staged is not None:
                    self._staged[rid] = staged
                    flags |= RING_INPUTS
        future: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        metadata = context.invocation_metadata() or ()
        ab_key, traceparent = _ab_key_and_trace(metadata)
        header = encode_header(
            context.time_remaining(),
            ab_key,
            flags,
            client=self._client(metadata),
            traceparent=traceparent,
        )
        try:
            self._outbox.put(None, (rid, header, payload))
            status, body = await future
        except ConnectionError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except asyncio.CancelledError:
            # The caller left (cancelled, or its deadline passed): the engine drops the
            # request if it is still queued (not one whose inputs are in our ring, which
            # runs to its answer); an answer still comes, and frees the slots.
            if self.lost is None:
                self._outbox.put(None, (rid, encode_header(None, None, kind=CANCEL), b""))
            raise
        finally:
            self._pending.pop(rid, None)
        if status[0] != OK:
            await context.abort(status_code(status[0]), body.decode())
        return body

    def _stage(self, payload: bytes) -> tuple[bytes, list[int] | None]:
        """The request with its tensors moved into the segment, or as it came."""
        assert self._ring is not None
        try:
            request = pb.ModelInferRequest.FromString(payload)
        except DecodeError:
            return payload, None  # the engine answers it, as for any caller
        staged = self._ring.stage(request)
        if staged is None:
            return payload, None
        return request.SerializeToString(), staged

    def close(self) -> None:
        self._socket.close()
        if self._ring is not None:
            self._ring.close()


def _int64s(values: list[int]) -> bytes:
    return array.array("q", values).tobytes()


def _ab_key_and_trace(metadata: Metadata) -> tuple[str | None, str | None]:
    """The A/B key and the W3C traceparent the caller sent, in one pass."""
    ab_key = traceparent = None
    for key, value in metadata:
        if key == _AB_KEY_HEADER:
            ab_key = value if isinstance(value, str) else value.decode()
        elif key == _TRACEPARENT:
            traceparent = value if isinstance(value, str) else value.decode()
    return ab_key, traceparent


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    # The caller's metadata goes along (A/B key, anything a servicer reads); the
    # access policy already ran here, on the caller's own connection.
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()) if not k.startswith(":"))


class _Proxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    """ModelInfer over the fast link; any other method, raw bytes to the engine."""

    def __init__(self, channel: grpc.aio.Channel, link: _InferLink) -> None:
        self._channel = channel
        self._link = link

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method == MODEL_INFER:
            return grpc.unary_unary_rpc_method_handler(self._link.infer)
        kind = _METHOD_KINDS.get(method)
        if kind is None:
            return None  # UNIMPLEMENTED, as the engine would answer
        if kind == "unary_unary":
            return grpc.unary_unary_rpc_method_handler(self._unary(method))
        if kind == "unary_stream":
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(method))
        return grpc.stream_stream_rpc_method_handler(self._stream_stream(method))

    def _unary(self, method: str) -> Any:
        call = self._channel.unary_unary(method)

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                answer: bytes = await call(
                    request, metadata=_forwarded(context), timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return answer

        return handler

    def _unary_stream(self, method: str) -> Any:
        call = self._channel.unary_stream(method)

        async def handler(
            request: bytes, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            try:
                async for answer in call(request, metadata=_forwarded(context)):
                    yield answer
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return handler

    def _stream_stream(self, method: str) -> Any:
        call = self._channel.stream_stream(method)

        async def handler(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            try:
                async for answer in call(requests, metadata=_forwarded(context)):
                    yield answer
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return handler


def _method_kinds() -> dict[str, str]:
    """Every method the engine serves, by its streaming kind, from the descriptors."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from ..pb import convoy_admin_pb2, convoy_monitoring_pb2, grpc_service_pb2

    kinds: dict[str, str] = {}
    for module in (
        grpc_service_pb2,
        convoy_admin_pb2,
        convoy_monitoring_pb2,
        health_pb2,
        reflection_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                kind = (
                    "stream_stream"
                    if m.client_streaming
                    else ("unary_stream" if m.server_streaming else "unary_unary")
                )
                kinds[f"/{service.full_name}/{m.name}"] = kind
    return kinds


_METHOD_KINDS = _method_kinds()
