"""LoopSocket: a ZeroMQ socket on the event loop without zmq.asyncio. Every message
arrives, in order, also when sends on the same socket consume the descriptor's
edge-triggered signal; a flood is delivered a burst or two per loop turn; a callback's
error does not stop delivery."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import zmq

from convoy.workers.loopsocket import BURST, LoopSocket


def _pair(
    tmp_path: Path,
) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes], zmq.Socket[bytes]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    for socket in (router, dealer):
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
    address = f"ipc://{tmp_path / 'link.ipc'}"
    router.bind(address)
    dealer.connect(address)
    return context, router, dealer


def test_ping_pong_never_loses_a_message(tmp_path: Path) -> None:
    """Each side answers from inside its receive callback: a send right after a
    message arrived must not swallow the signal of the next one."""

    async def body() -> None:
        context, router, dealer = _pair(tmp_path)
        done = asyncio.get_running_loop().create_future()
        rounds = 2000

        def engine(frames: list[bytes]) -> None:
            identity, payload = frames
            server.send([identity, payload])  # echo

        def client(frames: list[bytes]) -> None:
            n = int(frames[0])
            if n == rounds:
                done.set_result(n)
            else:
                front.send([str(n + 1).encode()])

        server = LoopSocket(router, engine)
        front = LoopSocket(dealer, client)
        server.start()
        front.start()
        front.send([b"1"])
        assert await asyncio.wait_for(done, 20) == rounds
        front.close()
        server.close()
        context.term()

    asyncio.run(body())


def test_a_flood_arrives_in_order_without_starving_the_loop(tmp_path: Path) -> None:
    async def body() -> None:
        context, router, dealer = _pair(tmp_path)
        got: list[int] = []
        turns: list[int] = []  # how many had arrived each time another callback ran

        def engine(frames: list[bytes]) -> None:
            got.append(int(frames[1]))

        server = LoopSocket(router, engine)
        server.start()
        count = 5 * BURST
        for i in range(count):
            dealer.send(str(i).encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(got) < count and loop.time() < deadline:
            turns.append(len(got))
            await asyncio.sleep(0)
        assert got == list(range(count))
        steps = [b - a for a, b in itertools.pairwise(turns)]
        # The loop ran between bursts (the descriptor's callback and the rescheduled
        # read may both run in one turn: at most two bursts then).
        assert max(steps, default=0) <= 2 * BURST, steps
        server.close()
        dealer.close(linger=0)
        context.term()

    asyncio.run(body())


def test_a_failing_callback_does_not_stop_delivery_and_close_stops_it(tmp_path: Path) -> None:
    async def body() -> None:
        context, router, dealer = _pair(tmp_path)
        got: list[bytes] = []

        def engine(frames: list[bytes]) -> None:
            if frames[1] == b"bad":
                raise ValueError("a bug in one handler")
            got.append(frames[1])

        server = LoopSocket(router, engine)
        server.start()
        for payload in (b"a", b"bad", b"b"):
            dealer.send(payload)
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == [b"a", b"b"]
        server.close()
        dealer.send(b"after")
        await asyncio.sleep(0.1)
        assert got == [b"a", b"b"]
        assert router.closed
        dealer.close(linger=0)
        context.term()

    asyncio.run(body())


def test_a_message_that_arrived_before_a_send_is_still_received(tmp_path: Path) -> None:
    """ZeroMQ's descriptor is edge-triggered: a send processes the socket's pending
    commands, which can consume the signal of a message that arrived just before.
    The message must still be delivered."""

    async def body() -> None:
        context, router, dealer = _pair(tmp_path)
        got: list[bytes] = []
        peers: list[bytes] = []

        def engine(frames: list[bytes]) -> None:
            peers.append(frames[0])
            got.append(frames[1])

        server = LoopSocket(router, engine)
        server.start()
        dealer.send(b"hello")  # the router learns the dealer's identity
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [b"hello"]
        for i in range(50):
            dealer.send(f"m{i}".encode())
            time.sleep(0.002)  # noqa: ASYNC251 (it arrives while the loop is busy here...)
            server.send([peers[0], b"reply"])  # ...and a send runs before the reader
            await asyncio.sleep(0)
        for _ in range(200):
            if len(got) == 51:
                break
            await asyncio.sleep(0.01)
        assert got[1:] == [f"m{i}".encode() for i in range(50)]
        server.close()
        dealer.close(linger=0)
        context.term()

    asyncio.run(body())
