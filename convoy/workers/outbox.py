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

from .wire import Triple, pack

log = logging.getLogger(__name__)

# Called with the triples a failed send carried, and the error.
OnError = Callable[[list[Triple], BaseException], None]
# Hands one message's frames to ZeroMQ without waiting (LoopSocket.send).
Send = Callable[[list[bytes]], None]


class Outbox:
    def __init__(self, send: Send, on_error: OnError | None = None) -> None:
        self._send = send
        self._on_error = on_error
        self._queued: dict[bytes | None, list[Triple]] = {}  # by ROUTER identity; None: DEALER
        self._scheduled = False

    def put(self, destination: bytes | None, triple: Triple) -> None:
        self._queued.setdefault(destination, []).append(triple)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what is queued now (also called at shutdown, before the socket closes)."""
        self._scheduled = False
        queued, self._queued = self._queued, {}
        for destination, items in queued.items():
            try:
                frames = pack(items)
                if destination is not None:
                    frames.insert(0, destination)
                self._send(frames)
            except Exception as exc:  # the socket closed under us (shutdown)
                self._failed(items, exc)

    def _failed(self, items: list[Triple], exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(items, exc)
        else:
            log.warning("%d messages to a front end not sent: %r", len(items), exc)
