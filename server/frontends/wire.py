"""The front end <-> engine messages for ModelInfer, as ZeroMQ frames.

Request (front end -> engine):  [request id, header, ModelInferRequest bytes]
Reply (engine -> front end):    [request id, status, ModelInferResponse bytes or message]

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
