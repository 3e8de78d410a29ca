"""The front end <-> engine messages for ModelInfer, as ZeroMQ frames.

Request (front end -> engine):  [request id, header, ModelInferRequest bytes] * n
Reply (engine -> front end):    [request id, status, ModelInferResponse bytes or message] * n

One ZeroMQ message carries every request (or reply) that became ready in one turn of
the sender's event loop: a message costs a wake-up of ZeroMQ's I/O thread and a
syscall or two on each side, and the profile showed those sends taking a sixth of
the engine's time when each answer went alone.

The header carries what the engine cannot read from the request itself: the caller's
remaining deadline and the A/B key from its gRPC metadata. The request and response
travel as the bytes gRPC received and will send: never parsed twice, never pickled.
"""

from __future__ import annotations

import struct

import grpc

_HEADER = struct.Struct("<d")  # remaining seconds; negative: no deadline
OK = 0

# gRPC status code number <-> enum (StatusCode values are (number, name) pairs).
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


Triple = tuple[bytes, bytes, bytes]


def flatten(triples: list[Triple]) -> list[bytes]:
    return [frame for triple in triples for frame in triple]


def triples(frames: list[bytes]) -> list[Triple]:
    """The (id, header or status, body) triples of one message; ValueError if torn."""
    if len(frames) % 3:
        raise ValueError(f"{len(frames)} frames do not make whole (id, header, body) triples")
    return [(frames[i], frames[i + 1], frames[i + 2]) for i in range(0, len(frames), 3)]


def encode_header(time_remaining: float | None, ab_key: str | None) -> bytes:
    seconds = -1.0 if time_remaining is None else time_remaining
    return _HEADER.pack(seconds) + (ab_key or "").encode()


def decode_header(frame: bytes) -> tuple[float | None, str | None]:
    (seconds,) = _HEADER.unpack_from(frame)
    key = frame[_HEADER.size :].decode() or None
    return (None if seconds < 0 else seconds), key


def status_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def status_code(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.INTERNAL)
