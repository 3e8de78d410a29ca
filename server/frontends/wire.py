"""The front end <-> engine messages for ModelInfer, each one ZeroMQ frame.

Request (front end -> engine):  (request id, header, ModelInferRequest bytes) * n
Reply (engine -> front end):    (request id, status, ModelInferResponse bytes or message) * n

Each triple is packed as three little-endian uint32 lengths, then its three parts:
one frame, not three per triple, because pyzmq spends ~3 µs of Python on every frame
it sends or receives (a batch of four answers was 13 frames, ~40 µs each way).

The header's kind says what the triple is: INFER (a request), HELLO (a front end
offering its shared-memory segment, body "pid:name"; answered like a request) or
FREE (ring offsets of outputs the front end has copied out, body int64s; no answer).
Large tensors do not travel in the messages but in that segment (ring.py): the
flags say whether the request's inputs name it and whether the engine may place
outputs there; a status frame's second byte says it did.

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

_HEADER = struct.Struct("<cdB")  # kind, remaining seconds (negative: none), flags
OK = 0
INFER, HELLO, FREE = b"I", b"H", b"F"
RING_INPUTS = 1  # the request's inputs are in the front end's segment
RING_OUTPUTS = 2  # the engine may place large outputs there
PLACED = 1  # status frame's second byte: some outputs are in the segment

# gRPC status code number <-> enum (StatusCode values are (number, name) pairs).
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


_LENGTHS = struct.Struct("<III")

Triple = tuple[bytes, bytes, bytes]


def pack(triples: list[Triple]) -> bytes:
    """The one frame that carries a turn's triples."""
    parts: list[bytes] = []
    for rid, head, body in triples:
        parts += (_LENGTHS.pack(len(rid), len(head), len(body)), rid, head, body)
    return b"".join(parts)


def unpack(frames: list[bytes]) -> list[Triple]:
    """The (id, header or status, body) triples of one message; ValueError if it is
    not one frame of whole triples."""
    if len(frames) != 1:
        raise ValueError(f"{len(frames)} frames where one was expected")
    frame = frames[0]
    triples: list[Triple] = []
    pos, end = 0, len(frame)
    while pos < end:
        if end - pos < _LENGTHS.size:
            raise ValueError(f"{end - pos} bytes left over after {len(triples)} triples")
        a, b, c = _LENGTHS.unpack_from(frame, pos)
        pos += _LENGTHS.size
        stop = pos + a + b + c
        if stop > end:
            raise ValueError(f"triple {len(triples)} runs {stop - end} bytes past the frame")
        head = pos + a
        triples.append((frame[pos:head], frame[head : head + b], frame[head + b : stop]))
        pos = stop
    return triples


def encode_header(
    time_remaining: float | None, ab_key: str | None, flags: int = 0, kind: bytes = INFER
) -> bytes:
    seconds = -1.0 if time_remaining is None else time_remaining
    return _HEADER.pack(kind, seconds, flags) + (ab_key or "").encode()


def decode_header(frame: bytes) -> tuple[bytes, float | None, str | None, int]:
    """(kind, seconds left or None, A/B key or None, flags)."""
    kind, seconds, flags = _HEADER.unpack_from(frame)
    key = frame[_HEADER.size :].decode() or None
    return kind, (None if seconds < 0 else seconds), key, flags


def status_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def status_code(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.INTERNAL)
