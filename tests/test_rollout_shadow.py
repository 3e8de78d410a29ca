"""ShadowRunner: mirrored runs never hold the caller, are compared, bounded and owned."""

from __future__ import annotations

import asyncio

import numpy as np

from convoy.errors import InternalError
from convoy.rollouts.compare import Array
from convoy.rollouts.shadow import INLINE_ELEMENTS, ShadowRunner
from convoy.rollouts.spec import Gates, make_spec
from tests.test_rollout_controller import make, run

SHADOW = make_spec("shadow", shadow_fraction=1.0, gates=Gates(max_divergence=0.1))


def test_mirrors_are_compared_after_the_answer_and_bounded() -> None:
    async def scenario() -> None:
        controller, _, _ = make()  # budget: 2 mirrored runs in flight
        await controller.start("m", "2", SHADOW)
        runner = ShadowRunner(controller)
        release = asyncio.Event()
        x = np.ones((1, 3), np.float32)

        async def run_on(version: str) -> dict[str, Array]:
            await release.wait()
            return {"y": 3 * x}

        started = [runner.after_answer("m", "1", {"y": 2 * x}, run_on) for _ in range(3)]
        assert started == [True, True, False]  # the third is shed, not queued
        assert runner.inflight == 2
        release.set()
        await runner.drain()
        window = controller.status("m")[0].windows["2"]
        assert window.compared == 2 and window.max_divergence == 1.0
        assert window.shadow_shed == 1
        assert runner.after_answer("m", "1", {"y": 2 * x}, run_on)  # budget returned

        await runner.close()
        assert runner.inflight == 0

    asyncio.run(scenario())


def test_large_outputs_are_compared_off_the_loop_and_failures_free_the_budget() -> None:
    async def scenario() -> None:
        controller, _, _ = make()
        await controller.start("m", "2", SHADOW)
        runner = ShadowRunner(controller)
        big = np.zeros((1, INLINE_ELEMENTS), np.float32)

        async def good(version: str) -> dict[str, Array]:
            return {"y": big + 0.5}

        async def broken(version: str) -> dict[str, Array]:
            raise InternalError("candidate crashed")

        for run_on in (good, broken, broken):
            assert runner.after_answer("m", "1", {"y": big}, run_on)
            await runner.drain()
        window = controller.status("m")[0].windows["2"]
        assert window.compared == 1 and window.max_divergence == 0.5

    asyncio.run(scenario())


def test_close_cancels_mirrors_in_flight_and_frees_their_budget() -> None:
    async def scenario() -> None:
        controller, _, _ = make()
        await controller.start("m", "2", SHADOW)
        runner = ShadowRunner(controller)

        async def never(version: str) -> dict[str, Array]:
            await asyncio.Event().wait()
            return {}

        assert runner.after_answer("m", "1", {}, never)
        assert runner.after_answer("m", "1", {}, never)
        await runner.close()
        assert controller.mirror("m", "1") == "2"  # budget back

    asyncio.run(scenario())


def test_no_rollout_no_mirror() -> None:
    controller, _, _ = make()
    runner = ShadowRunner(controller)

    async def scenario() -> bool:
        async def fail(version: str) -> dict[str, Array]:
            raise AssertionError("must not run")

        return runner.after_answer("m", "1", {}, fail)

    assert run(scenario()) is False


def test_detach_runs_only_for_a_started_mirror_and_before_the_answer_returns() -> None:
    """The servicer copies inputs that live in a front end's shared memory in
    `detach`: it must run before after_answer returns, and only when a run starts."""

    async def scenario() -> None:
        controller, _, _ = make()  # budget: 2 mirrored runs in flight
        await controller.start("m", "2", SHADOW)
        runner = ShadowRunner(controller)
        release = asyncio.Event()
        x = np.ones((1, 3), np.float32)
        detached: list[int] = []

        async def run_on(version: str) -> dict[str, Array]:
            await release.wait()
            return {"y": 2 * x}

        for i in range(3):
            runner.after_answer(
                "m", "1", {"y": 2 * x}, run_on, detach=lambda i=i: detached.append(i)
            )
            assert detached == list(range(min(i + 1, 2)))  # already, synchronously
        assert detached == [0, 1]  # the shed third copied nothing
        release.set()
        await runner.close()

    asyncio.run(scenario())
