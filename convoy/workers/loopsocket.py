"""A ZeroMQ socket driven by the event loop itself, without zmq.asyncio.

zmq.asyncio wraps every receive in a future and re-reads the socket's events through
Python Enum flags after each operation: profiled in the engine with two front ends,
that machinery was ~30 % of the loop's time (docs/benchmarks.md). Here the socket's
file descriptor is watched with loop.add_reader; when it signals, the messages
waiting are received at once (non-blocking, until zmq.Again) and each is handed to a
callback. Sends never wait: neither side sets a high-water mark (an answer must never
be dropped), so a non-blocking send is always taken; an error is the caller's.

ZeroMQ's descriptor is edge-triggered: it signals that the socket's state may have
changed, and any operation on the socket, a send too, may consume the signal of a
message that has just arrived. So after a send the socket is read again on the next
turn of the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq

log = logging.getLogger(__name__)

# Messages received per turn of the loop at most: a peer that never stops sending
# must not keep the loop from everything else.
BURST = 64
# As plain ints: pyzmq's enum members cost a Python-level Flag operation per test.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class LoopSocket:
    def __init__(self, socket: zmq.Socket[Any], on_message: Callable[[list[bytes]], None]) -> None:
        self.socket = socket
        self._on_message = on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._read_scheduled = False

    def start(self) -> None:
        """Deliver messages from now on (call on the loop that will own the socket)."""
        self._loop = asyncio.get_running_loop()
        fd = self.socket.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._loop.add_reader(fd, self._read)
        self._read_soon()  # what arrived before the reader was added signals nothing

    def send(self, frames: list[bytes]) -> None:
        """Queue one message with ZeroMQ; raises zmq.ZMQError if it cannot."""
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        finally:
            self._read_soon()  # even a failed send may have consumed the read signal

    def _read_soon(self) -> None:
        if not self._read_scheduled and self._loop is not None:
            self._read_scheduled = True
            self._loop.call_soon(self._read)

    def _read(self) -> None:
        self._read_scheduled = False
        if self._fd is None:
            return  # closed
        socket = self.socket
        for _ in range(BURST):
            try:
                # Asking first: a receive that finds nothing raises zmq.Again, 3x dearer.
                if not int(socket.getsockopt(_EVENTS)) & _POLLIN:
                    return
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # the context terminated (shutdown)
                log.warning("ZeroMQ receive failed: %s", exc)
                return
            try:
                self._on_message(frames)
            except Exception:  # one bad message must not stop every later one
                log.exception("ZeroMQ message not handled")
        self._read_soon()  # more may be waiting: the rest on the next turn

    def close(self) -> None:
        """Stop delivering and close the socket, dropping what is unsent."""
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None
        self.socket.close(linger=0)
