"""EngineLink: the engine's end of the front ends' ModelInfer traffic.

A ZeroMQ ROUTER socket on the event loop (loopsocket.py): each request from a front end
becomes one task that runs the server's one inference path (`InferencePath.infer`:
admission against the engine's one rate budget, routing, decode, cache, queue,
monitoring, shadow, encode) and sends back the serialised answer or the error's status.
Messages carry many requests or answers (wire.py): the answers one batch completes leave
together. The owner (ConvoyServer) starts and stops it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
from google.protobuf.message import DecodeError

from ..api.status import status_code
from ..errors import Cancelled, ConvoyError, InvalidInput
from ..heap import PAUSE_BUCKETS
from ..inference.admission import ANONYMOUS
from ..inference.caller import Caller, deadline_in
from ..inference.shm import BYTE_SIZE
from ..pb import grpc_service_pb2 as pb
from .loopsocket import LoopSocket
from .outbox import Outbox, Send
from .ring import SHM_DIR, EngineRing, Placed, Segment
from .wire import (
    CANCEL,
    FREE,
    HELLO,
    OK,
    PLACED,
    REPORT,
    RING_INPUTS,
    RING_OUTPUTS,
    Header,
    decode_header,
    deliver,
    status_number,
)

log = logging.getLogger(__name__)

# InferencePath.infer: (request, its caller: client, deadline, A/B key, the ring's regions
# its inputs name, where large outputs may go) -> the answer.
Infer = Callable[[pb.ModelInferRequest, Caller], Awaitable[pb.ModelInferResponse]]


class EngineLink:
    def __init__(self, address: str, infer: Infer, send: Send | None = None) -> None:
        """`send` replaces the ROUTER socket's own sends (loadtests/engine_cost.py
        measures the engine's path without sockets)."""
        self.address = address  # ipc://... on this host only
        self._infer = infer
        self._context = zmq.Context()
        socket = self._context.socket(zmq.ROUTER)
        # A ROUTER at its high-water mark drops messages silently: an answer lost so
        # would leave its caller waiting and its ring slots held. No mark, then.
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        self._socket = LoopSocket(socket, self.received)
        self._outbox = Outbox(send or self._socket.send)
        self._reading = False
        self._answering: set[asyncio.Task[None]] = set()
        # The requests in progress by (identity, request id), for a CANCEL to find.
        self._by_id: dict[tuple[bytes, bytes], asyncio.Task[None]] = {}
        self._rings: dict[bytes, EngineRing] = {}  # by front end (DEALER identity)
        # ModelInfer messages per front end's identity (a restarted one has a new one).
        self.requests: dict[bytes, int] = {}
        # Per identity, its last report of GC pauses: generation -> (cumulative bucket
        # counts, sum); a dead front end's stays, so a slot's totals never go back.
        self.gc_pauses: dict[bytes, dict[str, tuple[list[float], float]]] = {}
        # (direction, path) -> bytes, for the exporter; plain ints on the request path.
        self.tensor_bytes = dict.fromkeys(
            [(d, p) for d in ("input", "output") for p in ("shared_memory", "inline")], 0
        )

    async def start(self) -> None:
        sweep_segments()
        self._socket.socket.bind(self.address)
        self._socket.start()
        self._reading = True

    def received(self, frames: list[bytes]) -> None:
        """One message from a front end: its identity, then the packed triples."""
        if not self._reading:
            return  # stopping: what arrives now is not taken
        identity, *rest = frames
        deliver(rest, functools.partial(self._take, identity), "front end")

    def _take(self, identity: bytes, rid: bytes, header: bytes, payload: bytes) -> None:
        try:
            head = decode_header(header)
        except ValueError as exc:  # answered, so a caller never waits for nothing
            error = InvalidInput(f"the front end's request header is malformed: {exc}")
            self._outbox.put(
                identity, (rid, bytes([status_number(status_code(error))]), error.message.encode())
            )
            return
        kind = head.kind
        if kind == FREE:
            self._free(identity, payload)
        elif kind == HELLO:
            self._outbox.put(identity, (rid, *self._hello(identity, payload)))
        elif kind == REPORT:
            self._report(identity, payload)
        elif kind == CANCEL:
            self._cancel((identity, rid))
        else:
            self.requests[identity] = self.requests.get(identity, 0) + 1
            task = asyncio.get_running_loop().create_task(
                self._answer(identity, rid, payload, head)
            )
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
            if not head.flags & RING_INPUTS:
                # Cancellable. Inputs in the front end's ring are not: its slots are freed
                # by the answer, which must wait until no batch can read them any more.
                self._by_id[identity, rid] = task  # removed by _answer, or by a CANCEL

    def _cancel(self, key: tuple[bytes, bytes]) -> None:
        """The caller left: stop waiting for its answer, as the in-process path does
        when gRPC cancels a handler (the queue drops a request not yet dispatched, and
        a batch that took it runs on with its own bytes, the message's)."""
        task = self._by_id.pop(key, None)
        if task is not None and not task.done():
            task.add_done_callback(functools.partial(self._cancelled, key))
            task.cancel()

    def _cancelled(self, key: tuple[bytes, bytes], task: asyncio.Task[None]) -> None:
        """A cancelled request's one answer, if the cancel stopped it before it answered
        (maybe before it began): the front end frees its slots on it."""
        if task.cancelled():
            error = Cancelled("the caller cancelled the request")
            status = bytes([status_number(status_code(error))])
            self._outbox.put(key[0], (key[1], status, error.message.encode()))

    def _hello(self, identity: bytes, body: bytes) -> tuple[bytes, bytes]:
        """A front end offers its segment: map it (and unlink its name)."""
        self._forget_gone()
        try:
            pid, name = body.decode().split(":", 1)
            self._rings[identity] = EngineRing(Segment.attach(name), int(pid))
        except (ValueError, OSError) as exc:
            log.warning("front end's shared memory refused (%s): tensors travel inline", exc)
            return bytes([status_number(status_code(ConvoyError("")))]), str(exc).encode()
        return bytes([OK]), b""

    def _report(self, identity: bytes, body: bytes) -> None:
        """A front end's own figures, cumulative since it started: the latest kept."""
        try:
            report = json.loads(body)
            pauses = {
                str(generation): ([float(c) for c in counts], float(total))
                for generation, (counts, total) in report["gc"].items()
            }
            if any(len(counts) != len(PAUSE_BUCKETS) + 1 for counts, _ in pauses.values()):
                raise ValueError(f"GC pauses not in the {len(PAUSE_BUCKETS) + 1} buckets")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("a front end's report could not be read: %s", exc)
            return
        self.gc_pauses[identity] = pauses

    def _forget_gone(self) -> None:
        """Segments of front ends that have died (a restarted one says hello anew)."""
        for identity, ring in list(self._rings.items()):
            if not _alive(ring.pid):
                del self._rings[identity]
                ring.close()

    def _free(self, identity: bytes, body: bytes) -> None:
        ring = self._rings.get(identity)
        if ring is None:
            return
        try:
            ring.free(list(array.array("q", body)))
        except (KeyError, ValueError) as exc:
            log.error("front end freed what it does not hold: %s", exc)

    async def _answer(
        self,
        identity: bytes,
        rid: bytes,
        payload: bytes,
        head: Header,
    ) -> None:
        ring = self._rings.get(identity)
        regions = ring.regions if ring is not None and head.flags & RING_INPUTS else None
        placed = ring.placer() if ring is not None and head.flags & RING_OUTPUTS else None
        try:
            request = _parse(payload)
            self._count_inputs(request, regions is not None)
            key = head.ab_key
            caller = Caller(
                "grpc",
                head.client or ANONYMOUS,
                deadline_in(head.time_remaining),  # what the front end's caller had left
                lambda: key,
                regions,
                placed,
            )
            caller.traceparent = head.traceparent
            response = await self._infer(request, caller)
            status = bytes([OK, PLACED if placed is not None and placed.offsets else 0])
            reply = (rid, status, response.SerializeToString())
            self._count_outputs(response, placed)
        except ConvoyError as exc:
            reply = (rid, bytes([status_number(status_code(exc))]), exc.message.encode())
        except asyncio.CancelledError:
            raise  # by a CANCEL (answered by _cancelled) or at shutdown
        except Exception as exc:  # a bug must still answer, with INTERNAL, and be logged
            log.exception("ModelInfer from a front end failed")
            internal = status_number(status_code(ConvoyError("")))
            reply = (rid, bytes([internal]), f"internal error: {exc!r}".encode())
        finally:
            self._by_id.pop((identity, rid), None)
        if placed is not None and placed.offsets and reply[1][0] != OK:
            placed.ring.free(placed.offsets)  # nothing will read them
        # A front end that died meanwhile is not an error: ROUTER drops the reply.
        self._outbox.put(identity, reply)

    @property
    def segments(self) -> int:
        return len(self._rings)

    def _count_inputs(self, request: pb.ModelInferRequest, in_segment: bool) -> None:
        counts = self.tensor_bytes
        if in_segment:
            counts["input", "shared_memory"] += sum(
                t.parameters[BYTE_SIZE].int64_param for t in request.inputs
            )
        else:
            counts["input", "inline"] += sum(map(len, request.raw_input_contents))

    def _count_outputs(self, response: pb.ModelInferResponse, placed: Placed | None) -> None:
        counts = self.tensor_bytes
        counts["output", "inline"] += sum(map(len, response.raw_output_contents))
        if placed is not None and placed.offsets:
            counts["output", "shared_memory"] += placed.nbytes

    async def stop(self, timeout_s: float) -> None:
        """Stop reading; give the answers in progress up to timeout_s; close."""
        self._reading = False
        if self._answering:
            await asyncio.wait(list(self._answering), timeout=timeout_s)
        self._outbox.flush()
        self._socket.close()
        self._context.term()
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()


def _parse(payload: bytes) -> pb.ModelInferRequest:
    try:
        request: pb.ModelInferRequest = pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        raise InvalidInput("the request is not a valid ModelInferRequest message") from None
    return request


def _alive(pid: int) -> bool:
    """Whether `pid` is still one of this engine's front ends: a pid that has gone, or
    been reused by another user's process (EPERM), is not."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def sweep_segments(directory: Path = SHM_DIR) -> None:
    """Segments a front end created but no engine attached (it was killed between
    the two): their names are still in /dev/shm, with a dead pid in them."""
    for path in directory.glob("convoy-frontend-*-*"):
        try:
            pid = int(path.name.split("-")[2])
        except ValueError:
            continue
        if not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
