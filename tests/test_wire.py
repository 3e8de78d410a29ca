"""The front end <-> engine message format: a turn's triples packed in one frame,
large bodies in frames of their own (never copied into the first)."""

from __future__ import annotations

import pytest

from convoy.workers.wire import LARGE_BODY, pack, unpack


def test_triples_round_trip_with_empty_small_and_large_bodies() -> None:
    large = bytes(range(256)) * (LARGE_BODY // 256 + 1)
    triples = [
        (b"\x00" * 8, b"I\x00", b""),
        (b"id-2", b"", large),
        (b"", b"\xff" * 3, bytes(range(256))),
        (b"id-4", b"h", large[:LARGE_BODY]),
    ]
    frames = pack(triples)
    assert len(frames) == 3  # the packed triples, then the two large bodies
    assert frames[1] is large  # handed to ZeroMQ as it is, not copied
    assert len(frames[0]) < LARGE_BODY
    assert unpack(frames) == triples
    assert unpack(pack([])) == []


def _one(body: bytes = b"body") -> list[bytes]:
    return pack([(b"id", b"h", body)])


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "an empty message"),
        ([_one()[0][:-1]], "runs 1 bytes past the frame"),
        ([_one()[0] + b"\x01\x02"], "2 bytes left over after 1 triples"),
        ([_one(b"x" * LARGE_BODY)[0]], "triple 0's body frame is missing"),
        ([*_one(), b"stray"], "1 body frames left over after 1 triples"),
    ],
)
def test_a_torn_message_is_refused_with_what_is_wrong(frames: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack(frames)
