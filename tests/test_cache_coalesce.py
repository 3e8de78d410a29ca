"""Coalescing and the facade's request path: one computation for identical requests
in flight, errors shared but never stored, a follower's cancellation its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from convoy.batching.request import InferResult
from convoy.cache import CacheAnswer, CacheConfig, ResponseCache, request_key
from convoy.errors import DeadlineExceeded, InternalError

KEY = request_key("m", 1, {"X": np.arange(4, dtype=np.float32)}, ("Y",))


class Model:
    """A fake model: counts computations, each finishing when the test releases it."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.error: BaseException | None = None

    async def infer(self) -> InferResult:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return InferResult({"Y": np.full((1, 3), self.calls, np.float32)})


def spawn(
    cache: ResponseCache, model: Model, n: int, wait_s: float | None = None
) -> list[asyncio.Task[CacheAnswer]]:
    compute: Callable[[], Awaitable[InferResult]] = model.infer
    return [asyncio.create_task(cache.get_or_compute(KEY, compute, wait_s)) for _ in range(n)]


def test_32_identical_concurrent_requests_compute_once() -> None:
    async def main() -> None:
        cache, model = ResponseCache(CacheConfig(1 << 20)), Model()
        tasks = spawn(cache, model, 32)
        await asyncio.sleep(0)
        assert model.calls == 1 and cache.in_flight == 1
        model.release.set()
        answers = await asyncio.gather(*tasks)
        assert model.calls == 1
        assert [a.source for a in answers] == ["computed"] + ["coalesced"] * 31
        results = [a.result for a in answers]
        assert all(r.outputs["Y"].tobytes() == results[0].outputs["Y"].tobytes() for r in results)
        stats = cache.stats("m", 1)
        assert (stats.misses, stats.hits, stats.coalesced) == (1, 31, 31)
        later = await cache.get_or_compute(KEY, model.infer)  # now a plain hit
        assert later.source == "hit" and model.calls == 1
        assert later.result.outputs["Y"].tobytes() == results[0].outputs["Y"].tobytes()
        assert cache.stats("m", 1).hits == 32 and cache.in_flight == 0

    asyncio.run(main())


def test_an_error_reaches_every_waiter_and_is_not_cached() -> None:
    async def main() -> None:
        cache, model = ResponseCache(CacheConfig(1 << 20)), Model()
        model.error = InternalError("backend failed")
        tasks = spawn(cache, model, 5)
        await asyncio.sleep(0)
        model.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, InternalError) for o in outcomes) and model.calls == 1
        assert cache.entries == 0 and cache.in_flight == 0
        assert (cache.stats("m", 1).hits, cache.stats("m", 1).misses) == (0, 1)
        model.error = None
        answer = await cache.get_or_compute(KEY, model.infer)  # computed afresh
        assert model.calls == 2 and answer.result.outputs["Y"][0, 0] == 2

    asyncio.run(main())


def test_a_cancelled_follower_leaves_the_leader_and_the_others_alone() -> None:
    async def main() -> None:
        cache, model = ResponseCache(CacheConfig(1 << 20)), Model()
        leader, quitter, stayer = spawn(cache, model, 3)
        await asyncio.sleep(0)
        quitter.cancel()
        await asyncio.sleep(0)
        model.release.set()
        assert (await leader).result.outputs["Y"][0, 0] == 1
        assert (await stayer).result.outputs["Y"][0, 0] == 1
        assert quitter.cancelled() and model.calls == 1

    asyncio.run(main())


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
def test_when_the_leader_stops_for_its_own_reasons_a_follower_takes_over(stop: str) -> None:
    async def main() -> None:
        cache, model = ResponseCache(CacheConfig(1 << 20)), Model()
        first_release = model.release
        leader, *followers = spawn(cache, model, 3)
        await asyncio.sleep(0)
        model.release = asyncio.Event()  # the next computation waits on its own release
        if stop == "cancel":
            leader.cancel()
        else:
            model.error = DeadlineExceeded("the leader's deadline passed")
            first_release.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        model.error = None
        assert model.calls == 2 and cache.in_flight == 1  # one follower leads, one follows
        model.release.set()
        results = await asyncio.gather(*followers)
        assert sorted(a.source for a in results) == ["coalesced", "computed"]
        assert [a.result.outputs["Y"][0, 0] for a in results] == [2, 2]
        with pytest.raises((asyncio.CancelledError, DeadlineExceeded)):
            await leader

    asyncio.run(main())


def test_a_reload_during_a_computation_keeps_its_result_out_of_the_cache() -> None:
    async def main() -> None:
        cache, model = ResponseCache(CacheConfig(1 << 20)), Model()
        leader, follower = spawn(cache, model, 2)
        await asyncio.sleep(0)
        cache.clear_model("m")  # the model reloads while the old version computes
        model.release.set()
        await asyncio.gather(leader, follower)  # both still answered
        assert cache.entries == 0 and cache.lookup(KEY) is None

    asyncio.run(main())


def test_hit_and_miss_durations_come_from_the_injected_clock() -> None:
    async def main() -> None:
        ticks = iter(range(0, 10_000, 10))
        cache = ResponseCache(CacheConfig(1 << 20), clock=lambda: next(ticks))
        model = Model()
        model.release.set()
        await cache.get_or_compute(KEY, model.infer)
        await cache.get_or_compute(KEY, model.infer)
        stats = cache.stats("m", 1)
        assert (stats.miss.count, stats.miss.ns) == (1, 20)  # lookup + store
        assert (stats.hit.count, stats.hit.ns) == (1, 10)

    asyncio.run(main())


def test_a_follower_past_its_own_deadline_gives_up_alone() -> None:
    async def main() -> None:
        cache, model = ResponseCache(CacheConfig(1 << 20)), Model()
        (leader,) = spawn(cache, model, 1)
        await asyncio.sleep(0)
        (impatient,) = spawn(cache, model, 1, wait_s=0)
        with pytest.raises(DeadlineExceeded, match="waiting for an identical request"):
            await impatient
        model.release.set()
        assert (await leader).source == "computed" and model.calls == 1

    asyncio.run(main())
