"""The front end <-> engine messages for ModelInfer.

Request (front end -> engine):  (request id, header, ModelInferRequest bytes) * n
Reply (engine -> front end):    (request id, status, ModelInferResponse bytes or message) * n

A message's first frame packs its triples, each as three little-endian uint32 lengths
and then its three parts: one frame, not three per triple, because pyzmq spends ~3 µs
of Python on every frame it sends or receives (a batch of four answers was 13 frames).
A body of LARGE_BODY bytes or more is not copied in: its length reads EXTERNAL and it
travels as a frame of its own after the first (ZeroMQ sends it without a copy), in
order.

One ZeroMQ message carries every request (or reply) that became ready in one turn of
the sender's event loop: a message costs a wake-up of ZeroMQ's I/O thread and a
syscall or two on each side, and the profile showed those sends taking a sixth of
the engine's time when each answer went alone.

The header carries what the engine cannot read from the request itself: the caller's
remaining deadline, the name of its rate budget (admission.client_id of its token: the
engine charges every front end's callers to one set of buckets) and the A/B key from its
gRPC metadata. A CANCEL names an earlier
request whose caller has gone: the engine stops its wait for the answer (the queue
drops it if not yet dispatched) and answers it CANCELLED, unless its inputs are in the
front end's ring: those run to their answer, which frees the slots a batch may read.
The request and response travel as the bytes gRPC received and will send: never
parsed twice, never pickled.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Mapping
from typing import NamedTuple

import grpc

log = logging.getLogger(__name__)

# kind, remaining seconds (negative: none), flags, the client name's length; then the
# client name, with TRACED a traceparent (one length byte, then it), and the A/B key;
# each UTF-8.
_HEADER = struct.Struct("<cdBB")
OK = 0
INFER, HELLO, FREE, REPORT = b"I", b"H", b"F", b"R"  # REPORT: a front end's own figures
CANCEL = b"C"  # the caller of an earlier INFER (same request id) has gone
RING_INPUTS = 1  # the request's inputs are in the front end's segment
RING_OUTPUTS = 2  # the engine may place large outputs there
TRACED = 4  # the caller sent a W3C traceparent: the header carries it
PLACED = 1  # status frame's second byte: some outputs are in the segment

# gRPC status code number <-> enum (StatusCode values are (number, name) pairs).
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def peer_identity(index: int, pid: int, nonce: bytes | None = None) -> bytes:
    """A front end's socket identity: its slot, which a restarted front end takes over
    (the engine counts per slot), its pid and a random nonce, so that it never reuses a
    predecessor's identity, even under a reused pid (a ROUTER refuses a second peer
    under one identity, and the engine keeps each identity's last report)."""
    nonce = os.urandom(4) if nonce is None else nonce
    return f"frontend-{index}-{pid}-{nonce.hex()}".encode()


def peer_index(identity: bytes) -> int | None:
    """The slot in a `peer_identity`; None for any other identity."""
    parts = identity.split(b"-")
    if len(parts) == 4 and parts[0] == b"frontend" and parts[1].isdigit():
        return int(parts[1])
    return None


def per_slot(counts: Mapping[bytes, int]) -> dict[int, int]:
    """Counts by front-end identity summed per slot (its restarts included); other
    identities are left out."""
    slots: dict[int, int] = {}
    for identity, count in counts.items():
        index = peer_index(identity)
        if index is not None:
            slots[index] = slots.get(index, 0) + count
    return slots


_LENGTHS = struct.Struct("<III")
LARGE_BODY = 64 << 10  # pyzmq's own threshold for sending a frame without a copy
EXTERNAL = 0xFFFFFFFF  # the body's length field: it is the next frame of its own

Triple = tuple[bytes, bytes, bytes]


def pack(triples: list[Triple]) -> list[bytes]:
    """The frames of one message: the packed triples, then any large bodies."""
    parts: list[bytes] = []
    large: list[bytes] = []
    for rid, head, body in triples:
        if len(body) >= LARGE_BODY:
            parts += (_LENGTHS.pack(len(rid), len(head), EXTERNAL), rid, head)
            large.append(body)
        else:
            parts += (_LENGTHS.pack(len(rid), len(head), len(body)), rid, head, body)
    return [b"".join(parts), *large]


def unpack(frames: list[bytes]) -> list[Triple]:
    """The (id, header or status, body) triples of one message; ValueError if the
    frames do not hold whole triples."""
    if not frames:
        raise ValueError("an empty message")
    frame, large = frames[0], iter(frames[1:])
    triples: list[Triple] = []
    pos, end = 0, len(frame)
    while pos < end:
        if end - pos < _LENGTHS.size:
            raise ValueError(f"{end - pos} bytes left over after {len(triples)} triples")
        a, b, c = _LENGTHS.unpack_from(frame, pos)
        pos += _LENGTHS.size
        head = pos + a
        stop = head + b + (0 if c == EXTERNAL else c)
        if stop > end:
            raise ValueError(f"triple {len(triples)} runs {stop - end} bytes past the frame")
        if c == EXTERNAL:
            body = next(large, None)
            if body is None:
                raise ValueError(f"triple {len(triples)}'s body frame is missing")
        else:
            body = frame[head + b : stop]
        triples.append((frame[pos:head], frame[head : head + b], body))
        pos = stop
    extra = sum(1 for _ in large)
    if extra:
        raise ValueError(f"{extra} body frames left over after {len(triples)} triples")
    return triples


def deliver(frames: list[bytes], handle: Callable[[bytes, bytes, bytes], None], peer: str) -> None:
    """Hand each triple of one message to `handle`. A torn message is dropped and a
    failing handler logged: one bad message must not stop every later one."""
    try:
        triples = unpack(frames)
    except ValueError as exc:
        log.error("message from the %s ignored: %s", peer, exc)
        return
    for rid, head, body in triples:
        try:
            handle(rid, head, body)
        except Exception:
            log.exception("message from the %s not handled", peer)


def encode_header(
    time_remaining: float | None,
    ab_key: str | None,
    flags: int = 0,
    kind: bytes = INFER,
    client: str = "",
    traceparent: str | None = None,
) -> bytes:
    seconds = -1.0 if time_remaining is None else time_remaining
    name = client.encode()
    trace = b""
    if traceparent:
        # W3C's is 55 bytes; one longer than a length byte holds is not a traceparent.
        trace = traceparent.encode()[:255]
        flags |= TRACED
        trace = bytes([len(trace)]) + trace
    ab = (ab_key or "").encode()
    return _HEADER.pack(kind, seconds, flags, len(name)) + name + trace + ab


class Header(NamedTuple):  # a tuple: built once per request, on the engine's loop
    kind: bytes
    time_remaining: float | None
    ab_key: str | None
    flags: int
    client: str  # the caller's rate-budget name; "" for the front end's own messages
    traceparent: str | None = None  # the caller's W3C trace context, where it sent one


def decode_header(frame: bytes) -> Header:
    """ValueError for a header too short or names that are not UTF-8."""
    try:
        kind, seconds, flags, length = _HEADER.unpack_from(frame)
    except struct.error as exc:
        raise ValueError(f"a {len(frame)}-byte header: {exc}") from None
    start = _HEADER.size
    if len(frame) < start + length:
        raise ValueError(f"a {len(frame)}-byte header names a {length}-byte client")
    # UnicodeDecodeError is a ValueError
    client = frame[start : start + length].decode()
    start += length
    traceparent = None
    if flags & TRACED:
        if len(frame) <= start or len(frame) < start + 1 + frame[start]:
            raise ValueError(f"a {len(frame)}-byte header with a torn traceparent")
        end = start + 1 + frame[start]
        traceparent = frame[start + 1 : end].decode()
        start = end
    key = frame[start:].decode() or None
    return Header(kind, None if seconds < 0 else seconds, key, flags, client, traceparent)


def status_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def status_code(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.INTERNAL)
