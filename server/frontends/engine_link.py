"""EngineLink: the engine's end of the front ends' ModelInfer traffic.

A ZeroMQ ROUTER socket on the event loop: each request from a front end becomes one
task that runs the server's single inference path (`InferenceServicer.infer_message`:
routing, decode, cache, queue, monitoring, encode) and sends back the serialised
answer or the error's status. Messages carry many requests or answers (wire.py): the
answers one batch completes leave together. The owner (ConvoyServer) starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from ..errors import ConvoyError
from ..frontend.status import status_code
from ..pb import grpc_service_pb2 as pb
from .outbox import Outbox
from .wire import OK, decode_header, status_number, triples

log = logging.getLogger(__name__)

# (request, seconds left or None, A/B key reader) -> the answer.
Infer = Callable[
    [pb.ModelInferRequest, float | None, Callable[[], str | None]],
    Awaitable[pb.ModelInferResponse],
]


class EngineLink:
    def __init__(self, address: str, infer: Infer) -> None:
        self.address = address  # ipc://... on this host only
        self._infer = infer
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._outbox = Outbox(self._socket)
        self._reader: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._socket.bind(self.address)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            identity, *frames = await self._socket.recv_multipart()
            try:
                requests = triples(frames)
            except ValueError as exc:
                log.error("front-end message ignored: %s", exc)
                continue
            loop = asyncio.get_running_loop()
            for rid, header, payload in requests:
                task = loop.create_task(self._answer(identity, rid, header, payload))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)

    async def _answer(self, identity: bytes, rid: bytes, header: bytes, payload: bytes) -> None:
        try:
            time_remaining, key = decode_header(header)
            request = pb.ModelInferRequest.FromString(payload)
            response = await self._infer(request, time_remaining, lambda: key)
            reply = (rid, bytes([OK]), response.SerializeToString())
        except ConvoyError as exc:
            reply = (rid, bytes([status_number(status_code(exc))]), exc.message.encode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still answer, with INTERNAL, and be logged
            log.exception("ModelInfer from a front end failed")
            internal = status_number(status_code(ConvoyError("")))
            reply = (rid, bytes([internal]), f"internal error: {exc!r}".encode())
        # A front end that died meanwhile is not an error: ROUTER drops the reply.
        self._outbox.put(identity, reply)

    async def stop(self, timeout_s: float) -> None:
        """Stop reading; give the answers in progress up to timeout_s; close."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._answering:
            await asyncio.wait(list(self._answering), timeout=timeout_s)
        await self._outbox.drain(timeout_s)
        self._socket.close(linger=0)
        self._context.term()
