"""The front ends' series on the engine's metrics port, from stand-ins for the link and
the supervisor: per slot, across a restart, and for a process that has gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from convoy.procstat import process_usage
from convoy.workers.exporter import FrontendCollector
from convoy.workers.wire import peer_identity, peer_index


class _Link:
    segments = 1
    tensor_bytes = {("input", "inline"): 10}

    def __init__(self, requests: dict[bytes, int]) -> None:
        self.requests = requests
        self.gc_pauses: dict[bytes, dict[str, tuple[list[float], float]]] = {}


class _Supervisor:
    restarts = 1

    def __init__(self, pids_by_index: dict[int, int]) -> None:
        self.pids_by_index = pids_by_index
        self.pids = list(pids_by_index.values())


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: nothing at /proc/<pid> any more
    return child.pid


def _scrape(link: Any, supervisor: Any) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(FrontendCollector(link, supervisor))
    text = generate_latest(registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_identity_names_the_slot() -> None:
    assert peer_index(peer_identity(3, 4242)) == 3
    assert peer_identity(3, 4242) != peer_identity(3, 4243)  # a restart: a new identity
    assert peer_identity(3, 4242) != peer_identity(3, 4242)  # even under a reused pid
    assert peer_identity(3, 4242, b"\x01\x02") == b"frontend-3-4242-0102"
    assert peer_index(b"\x00k\x8bEg") is None  # ZeroMQ's own generated identities
    assert peer_index(b"frontend-x-1") is None


def test_requests_are_counted_per_slot_across_a_restart() -> None:
    gone = _gone_pid()
    link = _Link(
        {
            peer_identity(0, gone): 40,  # slot 0 before it was restarted
            peer_identity(0, os.getpid()): 2,
            peer_identity(1, 7): 5,
            b"\x00unnamed": 9,  # not a front end's: not counted under any slot
        }
    )
    scraped = _scrape(link, _Supervisor({0: os.getpid(), 1: gone}))
    assert scraped['convoy_frontend_requests_total{frontend="0"}'] == 42
    assert scraped['convoy_frontend_requests_total{frontend="1"}'] == 5
    assert sum(v for k, v in scraped.items() if k.startswith("convoy_frontend_requests")) == 47
    # CPU and memory only for a process that is there (slot 1's has gone).
    assert scraped['convoy_frontend_cpu_seconds_total{frontend="0"}'] > 0
    assert scraped['convoy_frontend_resident_memory_bytes{frontend="0"}'] > 10 << 20
    assert not any('frontend="1"' in k for k in scraped if "cpu" in k or "memory" in k)


def test_process_usage_reads_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    stat = "123 (a (b) c) S 1 1 1 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 1 0 100 1000 77 0"
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "stat").write_text(stat)
    cpu, rss = process_usage(123, proc=tmp_path)  # type: ignore[misc]
    assert cpu == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    assert rss == 77 * os.sysconf("SC_PAGE_SIZE")
    assert process_usage(124, proc=tmp_path) is None
    # One thread's own line, under task/<tid>.
    (tmp_path / "123" / "task" / "124").mkdir(parents=True)
    (tmp_path / "123" / "task" / "124" / "stat").write_text(stat.replace(" 250 50 ", " 25 5 "))
    assert process_usage(123, 124, tmp_path)[0] == pytest.approx(30 / os.sysconf("SC_CLK_TCK"))  # type: ignore[index]


def _pauses(counts: list[float], total: float) -> dict[str, tuple[list[float], float]]:
    return {"0": (counts, total)}


def test_gc_pauses_add_up_per_slot_in_the_engines_own_buckets() -> None:
    import gc

    from convoy.heap import PAUSE_BUCKETS, GcPauses

    width = len(PAUSE_BUCKETS) + 1
    link = _Link({})
    link.gc_pauses = {
        peer_identity(0, 1): _pauses([1.0] * width, 0.5),  # slot 0 before its restart
        peer_identity(0, 2): _pauses([0.0] + [2.0] * (width - 1), 0.25),
        b"\x00unnamed": _pauses([5.0] * width, 1.0),
    }
    scraped = _scrape(link, _Supervisor({}))
    assert scraped['convoy_frontend_gc_pause_seconds_count{frontend="0",generation="0"}'] == 3
    assert scraped['convoy_frontend_gc_pause_seconds_sum{frontend="0",generation="0"}'] == 0.75
    first = f'frontend="0",generation="0",le="{PAUSE_BUCKETS[0]!r}"'
    assert scraped[f"convoy_frontend_gc_pause_seconds_bucket{{{first}}}"] == 1
    assert not any('frontend="1"' in k for k in scraped)
    # The same bucket bounds, written the same way, as the engine's convoy_gc_pause_seconds.
    registry = CollectorRegistry()
    engine = GcPauses(registry)
    engine.start()
    gc.collect()
    engine.close()
    own = {k.split("le=")[1] for k in generate_latest(registry).decode().split() if "le=" in k}
    ours = {k.split("le=")[1].split("}")[0] for k in scraped if "le=" in k}
    assert {o.rstrip("}") for o in own} == ours


def test_the_engine_keeps_each_front_ends_last_readable_report() -> None:
    """A report replaces its sender's previous one; an unreadable one, or one in other
    buckets, is logged and leaves what was there (a scrape never fails over it)."""
    import json

    from convoy.heap import PAUSE_BUCKETS
    from convoy.workers.engine_link import EngineLink

    async def infer(*_: object) -> None:
        raise AssertionError("no inference here")

    link = EngineLink("ipc:///tmp/convoy-test-unbound.ipc", infer)  # type: ignore[arg-type]
    try:
        width = len(PAUSE_BUCKETS) + 1
        who = peer_identity(0, 1)
        link._report(who, json.dumps({"gc": {"2": [[1.0] * width, 0.5]}}).encode())
        link._report(who, json.dumps({"gc": {"2": [[2.0] * width, 0.75]}}).encode())
        for bad in (b"{", b'{"gc": 3}', json.dumps({"gc": {"2": [[1.0] * 3, 0.5]}}).encode()):
            link._report(who, bad)
        assert link.gc_pauses == {who: {"2": ([2.0] * width, 0.75)}}
    finally:
        link._socket.socket.close()
        link._context.term()


def test_a_snapshot_is_what_the_histogram_holds() -> None:
    import gc

    from convoy.heap import PAUSE_BUCKETS, GcPauses

    pauses = GcPauses(CollectorRegistry())
    pauses.start()
    gc.collect()
    pauses.close()
    snapshot = pauses.snapshot()
    assert set(snapshot) == {"0", "1", "2"}
    counts, total = snapshot["2"]
    assert len(counts) == len(PAUSE_BUCKETS) + 1 and counts[-1] >= 1 and total > 0
    assert counts == sorted(counts)  # cumulative


def test_a_request_with_a_malformed_header_is_answered_invalid_argument() -> None:
    """A header too short to decode, or whose A/B key is not UTF-8: the engine answers
    the request id (its caller must not wait for ever) and goes on taking requests."""
    import asyncio

    import grpc

    from convoy.workers.engine_link import EngineLink
    from convoy.workers.wire import encode_header, pack, status_number, unpack

    async def infer(*_: object) -> None:
        raise AssertionError("a malformed request must not reach the model")

    async def body() -> list[tuple[bytes, bytes, bytes]]:
        sent: list[list[bytes]] = []
        link = EngineLink("ipc:///tmp/convoy-test-unbound.ipc", infer, sent.append)  # type: ignore[arg-type]
        try:
            link._reading = True
            who = peer_identity(0, 1)
            bad_key = encode_header(None, None) + b"\xff\xfe"
            link.received([who, *pack([(b"r1", b"\x01", b""), (b"r2", bad_key, b"")])])
            await asyncio.sleep(0)
            return [t for frames in sent for t in unpack(frames[1:])]
        finally:
            link._socket.socket.close()
            link._context.term()

    answers = asyncio.run(body())
    invalid = bytes([status_number(grpc.StatusCode.INVALID_ARGUMENT)])
    assert [(rid, status) for rid, status, _ in answers] == [(b"r1", invalid), (b"r2", invalid)]
    assert all(b"header is malformed" in message for _, _, message in answers)


def test_a_cancel_stops_the_request_and_it_is_answered_cancelled_once() -> None:
    """A CANCEL for a request still waiting (also one in the same message as it, not
    yet begun) stops it; the engine answers it CANCELLED, once, since the answer frees
    the front end's slots. A CANCEL for a request already answered changes nothing."""
    import asyncio

    import grpc

    from convoy.workers.engine_link import EngineLink
    from convoy.workers.wire import CANCEL, encode_header, pack, status_number, unpack

    async def body() -> tuple[list[tuple[bytes, bytes, bytes]], list[str]]:
        forever = asyncio.Event()
        began: list[str] = []

        async def infer(request: Any, *_: object) -> Any:
            began.append(request.id)
            await forever.wait()

        sent: list[list[bytes]] = []
        link = EngineLink("ipc:///tmp/convoy-test-unbound.ipc", infer, sent.append)
        try:
            link._reading = True
            who = peer_identity(0, 1)
            request = b"\x1a\x02r1"  # ModelInferRequest(id="r1")
            cancel = encode_header(None, None, kind=CANCEL)
            infer_header = encode_header(None, None)
            link.received([who, *pack([(b"a", infer_header, request), (b"a", cancel, b"")])])
            link.received([who, *pack([(b"b", infer_header, request)])])
            for _ in range(5):
                await asyncio.sleep(0)
            link.received([who, *pack([(b"b", cancel, b""), (b"zz", cancel, b"")])])
            for _ in range(5):
                await asyncio.sleep(0)
            link.received([who, *pack([(b"b", cancel, b"")])])  # answered already
            for _ in range(5):
                await asyncio.sleep(0)
            return [t for frames in sent for t in unpack(frames[1:])], began
        finally:
            link._socket.socket.close()
            link._context.term()

    answers, began = asyncio.run(body())
    cancelled = bytes([status_number(grpc.StatusCode.CANCELLED)])
    assert [(rid, status) for rid, status, _ in answers] == [(b"a", cancelled), (b"b", cancelled)]
    assert began == ["r1"]  # "b" began; "a" was cancelled before it did


def test_a_cancel_leaves_a_request_whose_inputs_are_in_the_ring_to_its_answer() -> None:
    """Its slots are freed by its answer: a CANCELLED reply while a batch still reads
    them would let the front end stage another caller's tensor there."""
    import asyncio

    from convoy.workers.engine_link import EngineLink
    from convoy.workers.wire import CANCEL, OK, RING_INPUTS, encode_header, pack, unpack

    async def body() -> tuple[list[tuple[bytes, bytes, bytes]], list[tuple[bytes, bytes, bytes]]]:
        release = asyncio.Event()

        async def infer(*_: object) -> Any:
            await release.wait()
            from convoy.pb import grpc_service_pb2 as pb

            return pb.ModelInferResponse(id="r1")

        sent: list[list[bytes]] = []
        link = EngineLink("ipc:///tmp/convoy-test-unbound.ipc", infer, sent.append)
        try:
            link._reading = True
            who = peer_identity(0, 1)
            staged = encode_header(None, None, flags=RING_INPUTS)
            link.received([who, *pack([(b"a", staged, b"\x1a\x02r1")])])
            for _ in range(5):
                await asyncio.sleep(0)
            link.received([who, *pack([(b"a", encode_header(None, None, kind=CANCEL), b"")])])
            for _ in range(5):
                await asyncio.sleep(0)
            before = [t for frames in sent for t in unpack(frames[1:])]
            release.set()
            for _ in range(5):
                await asyncio.sleep(0)
            return before, [t for frames in sent for t in unpack(frames[1:])]
        finally:
            link._socket.socket.close()
            link._context.term()

    before, after = asyncio.run(body())
    assert before == []
    assert [(rid, status[0]) for rid, status, _ in after] == [(b"a", OK)]
