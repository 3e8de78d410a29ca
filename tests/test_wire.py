"""The front end <-> engine message format: a turn's triples packed in one frame."""

from __future__ import annotations

import pytest

from server.frontends.wire import pack, unpack


def test_triples_round_trip_with_empty_and_large_parts() -> None:
    triples = [
        (b"\x00" * 8, b"I\x00", b""),
        (b"id-2", b"", b"x" * 70_000),
        (b"", b"\xff" * 3, bytes(range(256))),
    ]
    assert unpack([pack(triples)]) == triples
    assert unpack([pack([])]) == []


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([b"a", b"b"], "2 frames where one was expected"),
        ([pack([(b"id", b"h", b"body")])[:-1]], "runs 1 bytes past the frame"),
        ([pack([(b"id", b"h", b"body")]) + b"\x01\x02"], "2 bytes left over after 1 triples"),
    ],
)
def test_a_torn_message_is_refused_with_what_is_wrong(frames: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack(frames)
