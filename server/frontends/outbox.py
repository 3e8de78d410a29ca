"""Outbox: what one turn of the event loop produced leaves as one ZeroMQ message.

Requests a front end receives together, and answers one batch completes together, are
queued here and sent at the end of the loop's turn (call_soon) as a single multipart
message per destination, instead of one message (one wake-up of ZeroMQ's I/O thread,
a syscall or two on each side) apiece.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from .wire import Triple, flatten

log = logging.getLogger(__name__)

# Called with the triples a failed send carried, and the error.
OnError = Callable[[list[Triple], BaseException], None]


class Outbox:
    def __init__(self, socket: Any, on_error: OnError | None = None) -> None:
        self._socket = socket  # a zmq.asyncio socket: send_multipart returns a future
        self._on_error = on_error
        self._queued: dict[bytes | None, list[Triple]] = {}  # by ROUTER identity; None: DEALER
        self._scheduled = False
        self._sending: set[asyncio.Future[Any]] = set()

    def put(self, destination: bytes | None, triple: Triple) -> None:
        self._queued.setdefault(destination, []).append(triple)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        queued, self._queued = self._queued, {}
        for destination, items in queued.items():
            frames = flatten(items)
            if destination is not None:
                frames.insert(0, destination)
            try:
                sent = self._socket.send_multipart(frames, copy=False)
            except Exception as exc:  # the socket closed under us (shutdown)
                self._failed(items, exc)
                continue
            self._sending.add(sent)
            sent.add_done_callback(partial(self._sent, items))

    async def drain(self, timeout_s: float) -> None:
        """Send what is queued now and wait (up to timeout_s) until every send is done."""
        if self._scheduled:
            self._flush()
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=timeout_s)

    def _sent(self, items: list[Triple], sent: asyncio.Future[Any]) -> None:
        self._sending.discard(sent)
        if sent.cancelled():
            self._failed(items, asyncio.CancelledError())
        elif sent.exception() is not None:
            self._failed(items, sent.exception())  # type: ignore[arg-type]

    def _failed(self, items: list[Triple], exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(items, exc)
        else:
            log.warning("%d messages to a front end not sent: %r", len(items), exc)
