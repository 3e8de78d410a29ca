"""The front ends' shared-memory rings: placement never overlaps, space comes back in
any free order, a full ring says so (the caller then sends the tensor inline)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from pathlib import Path

import numpy as np
import pytest

from convoy.inference.codec import decode_request
from convoy.inference.shm import Leases
from convoy.pb import grpc_service_pb2 as pb
from convoy.workers.ring import ALIGN, INLINE_BELOW, EngineRing, FrontendRing, Ring, Segment

from .test_codec import spec


def _overlaps(live: dict[int, int]) -> bool:
    spans = sorted(live.items())
    return any(a + s > b for (a, s), (b, _) in itertools.pairwise(spans))


def test_random_allocations_and_frees_never_overlap_and_stay_in_bounds() -> None:
    rng = random.Random(7)
    ring = Ring(64 * 1024)
    live: dict[int, int] = {}
    refused = 0
    for _ in range(20000):
        if live and (rng.random() < 0.5 or len(live) > 40):
            offset = rng.choice(list(live))
            ring.free(offset)
            del live[offset]
        else:
            size = rng.choice([1, 63, 64, 100, 4096, 10000, 30000])
            offset = ring.allocate(size)
            if offset is None:
                refused += 1
                continue
            assert offset % ALIGN == 0 and offset + size <= ring.capacity
            live[offset] = -(-size // ALIGN) * ALIGN
            assert not _overlaps(live)
    assert refused > 0  # the test reached a full ring
    for offset in list(live):
        ring.free(offset)
    assert ring.live == 0
    assert ring.allocate(ring.capacity) == 0  # all space came back


def test_a_full_ring_refuses_and_space_comes_back_from_the_oldest_block() -> None:
    ring = Ring(1024)
    a = ring.allocate(512)
    b = ring.allocate(256)
    assert (a, b) == (0, 512)
    assert ring.allocate(512) is None  # 256 left at the end, nothing before the tail
    ring.free(b)  # freed out of order: the older block still holds the ring's tail
    assert ring.allocate(512) is None
    c = ring.allocate(200)
    assert c == 768
    ring.free(a)  # the tail moves past a and the freed b, to c
    assert ring.allocate(700) == 0  # wrapped to the start, short of c
    assert ring.allocate(64) is None  # 0..704 taken, c from 768: 64 would touch c
    with pytest.raises(KeyError):
        ring.free(64)
    assert ring.allocate(2048) is None  # larger than the ring


def test_the_engine_maps_the_segment_and_unlinks_its_name(tmp_path: Path) -> None:
    front = Segment.create(4096, tmp_path)
    assert (tmp_path / front.name).exists()
    front.view(100, 5)[:] = b"hello"
    engine = Segment.attach(front.name, tmp_path)
    assert not (tmp_path / front.name).exists()  # nothing left behind if either dies
    assert engine.half == 4096 and bytes(engine.view(100, 5)) == b"hello"
    engine.view(4096 + 8, 3)[:] = b"out"
    assert bytes(front.view(4096 + 8, 3)) == b"out"
    with pytest.raises(ValueError):
        Segment.attach("../etc/passwd", tmp_path)
    front.close()
    engine.close()


def _request(value: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="ids", datatype="INT64", shape=[1, 16384])
    message.raw_input_contents.append(np.full((1, 16384), value, np.int64).tobytes())
    return message


def test_staged_inputs_reach_the_engine_in_place_and_read_only(tmp_path: Path) -> None:
    """The engine's arrays are views of the front end's slot (no copy), read-only like
    inline inputs: the slot is the front end's again once the request is answered."""
    front = FrontendRing(Segment.create(1 << 20, tmp_path))
    engine = EngineRing(Segment.attach(front.segment.name, tmp_path), 1)
    request = _request(3)
    staged = front.stage(request)
    assert staged is not None and not request.raw_input_contents
    loop = asyncio.new_event_loop()
    leases = Leases()
    asked = decode_request(
        request, spec(tmp_path), loop, 0, None, shm=engine.regions, leases=leases
    )
    ids = asked.inputs["ids"]
    assert int(ids.sum()) == 3 * 16384 and not ids.flags.writeable
    front.segment.view(staged[0], 8)[:] = np.int64(5).tobytes()
    assert int(ids[0, 0]) == 5  # the same memory
    leases.release()
    loop.close()


def test_a_request_with_a_client_region_is_left_as_it_came(tmp_path: Path) -> None:
    """Inputs or outputs in the client's own shared memory: the engine must resolve
    them against the client's registry, so the front end moves nothing."""
    front = FrontendRing(Segment.create(1 << 20, tmp_path))
    request = _request(1)
    out = request.outputs.add(name="y")
    out.parameters["shared_memory_region"].string_param = "client_out"
    out.parameters["shared_memory_byte_size"].int64_param = 1024
    assert front.stage(request) is None and len(request.raw_input_contents) == 1
    front.close()


def test_the_engine_sweeps_segments_whose_front_end_died_before_attaching(
    tmp_path: Path,
) -> None:
    from convoy.workers.engine_link import sweep_segments

    dead = tmp_path / "convoy-frontend-999999999-0badc0de"  # no such pid
    alive = tmp_path / f"convoy-frontend-{os.getpid()}-0badc0de"
    other = tmp_path / "convoy-frontend-notapid-x"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    sweep_segments(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_free_naming_a_block_not_held_still_frees_the_rest(tmp_path: Path) -> None:
    front = Segment.create(1 << 20, tmp_path)
    engine = EngineRing(Segment.attach(front.name, tmp_path), os.getpid())
    placed = engine.placer()
    for _ in range(3):
        assert placed(INLINE_BELOW) is not None
    assert engine.outputs.live == 3
    with pytest.raises(KeyError, match="12345"):
        engine.free([12345, *placed.offsets])
    assert engine.outputs.live == 0
    engine.close()
    front.close()
