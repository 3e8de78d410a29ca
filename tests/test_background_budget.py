"""The background loop budget (issue 27) on a fake clock: its share of the loop while
callers are about, no limit without them, a small burst, debt paid by waiting; the
pacing's waiters in order, at their deadline, and when the server drains."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from convoy.batching.budget import CALLERS_RECENT_NS, ShareBudget, parse_share
from convoy.errors import ConfigError, DeadlineExceeded, Unavailable
from convoy.inference.admission import Draining
from convoy.inference.background import (
    BURST_NS,
    BackgroundPacing,
)

from .fakes import FakeClock

MS = 1_000_000
COST = 300_000  # a background request's loop time


def budget(share: float = 0.02, clock: FakeClock | None = None) -> ShareBudget:
    return ShareBudget(share, BURST_NS, clock=clock or FakeClock())


def test_no_limit_while_no_caller_is_about() -> None:
    clock = FakeClock()
    loop = budget(clock=clock)
    for _ in range(1000):  # a job alone: far more than any share
        assert loop.delay_ns() == 0
        loop.charge(COST)
        clock.now += COST
    # A caller long ago is not about.
    loop.caller_arrived()
    clock.now += CALLERS_RECENT_NS + 1
    loop.charge(100 * MS)
    assert loop.delay_ns() == 0


def test_the_share_holds_over_a_window_while_callers_come() -> None:
    clock = FakeClock()
    loop = budget(0.02, clock)
    loop.caller_arrived()
    start, served, charged = clock.now, 0, 0
    next_caller = clock.now
    while clock.now - start < 10_000 * MS:
        if clock.now >= next_caller:  # a caller every 100 ms keeps them about
            loop.caller_arrived()
            next_caller += 100 * MS
        delay = loop.delay_ns()
        if delay:
            clock.now += min(delay, next_caller - clock.now)
            continue
        loop.charge(COST)
        clock.now += COST  # the request's own loop time passes too
        served, charged = served + 1, charged + COST
    window = clock.now - start
    assert charged <= 0.02 * window + BURST_NS + COST
    assert charged >= 0.02 * window - COST  # and it is not starved
    assert 640 <= served <= 680  # 0.02 x 10 s / 0.3 ms = 667


def test_a_burst_of_a_few_requests_after_a_quiet_spell() -> None:
    clock = FakeClock()
    loop = budget(0.02, clock)
    loop.caller_arrived()
    passed = 0
    while loop.delay_ns() == 0:
        loop.charge(COST)
        passed += 1
    assert passed == -(-BURST_NS // COST)  # 2 ms of loop time: 7 requests, not more
    # A quiet spell refills the burst, never more than the burst.
    clock.now += 900 * MS
    loop.caller_arrived()
    assert loop.delay_ns() == 0
    assert loop.level_ns == BURST_NS


def test_debt_is_paid_by_waiting_until_the_callers_go() -> None:
    clock = FakeClock()
    loop = budget(0.02, clock)
    loop.caller_arrived()
    loop.charge(BURST_NS + 4 * MS)  # a large request: 4 ms of debt
    assert loop.delay_ns() == 200 * MS  # 4 ms at 2%
    clock.now += 100 * MS
    assert loop.delay_ns() == 100 * MS
    loop.charge(20 * MS)  # more debt than the callers' second has left
    assert loop.delay_ns() == CALLERS_RECENT_NS - 100 * MS + 1
    clock.now += CALLERS_RECENT_NS  # the callers have gone: no limit, and full again
    assert loop.delay_ns() == 0
    loop.caller_arrived()
    assert loop.delay_ns() == 0 and loop.level_ns == BURST_NS


def test_charges_are_counted_callers_or_not() -> None:
    loop = budget()
    loop.charge(COST)
    loop.caller_arrived()
    loop.charge(COST)
    assert loop.charged_ns == 2 * COST


@pytest.mark.parametrize("text", ["0", "-0.1", "1.5", "nan", "half"])
def test_a_share_outside_0_to_1_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"must be above 0 and at most 1|is not a number"):
        parse_share(text)
    assert parse_share("1") == 1.0 and parse_share("0.05") == 0.05


def test_the_flag_names_itself_when_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from convoy.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--background-loop-share", "0"])
    assert "--background-loop-share: must be above 0 and at most 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--background-compute-share", "1.5"])
    assert "--background-compute-share: must be above 0 and at most 1" in (capsys.readouterr().err)
    args = build_parser().parse_args(["serve"])
    assert args.background_loop_share == 0.01
    assert args.background_compute_share == 0.05


def test_a_server_config_with_a_bad_share_does_not_start(tmp_path: Path) -> None:
    from convoy.app import ConvoyServer
    from convoy.config import ServerConfig, ServingLimits

    with pytest.raises(ConfigError, match="--background-loop-share"):
        ConvoyServer(ServerConfig(background_loop_share=0.0), tmp_path)
    with pytest.raises(ConfigError, match="--background-compute-share"):
        ConvoyServer(ServerConfig(limits=ServingLimits(background_compute_share=2.0)), tmp_path)


def test_the_counters_are_exported_when_scraped() -> None:
    from prometheus_client import generate_latest

    from convoy.metrics import BackgroundReading, Metrics

    metrics = Metrics(gpus=list)
    metrics.watch_background(lambda: BackgroundReading(3, 1.5, 0.25))
    text = generate_latest(metrics.registry).decode()
    assert "convoy_background_budget_waits_total 3.0" in text
    assert "convoy_background_budget_wait_seconds_total 1.5" in text
    assert "convoy_background_loop_seconds_total 0.25" in text


# -- the pacing: waiting on the budget -------------------------------------------------------


class FakeSleep:
    """asyncio.sleep on the fake clock: the time passes at once, the loop turns once."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += int(seconds * 1e9)
        await asyncio.sleep(0)


def pacing(share: float = 0.02) -> tuple[BackgroundPacing, FakeClock, FakeSleep, Draining]:
    clock = FakeClock()
    draining = Draining()
    sleep = FakeSleep(clock)
    return (
        BackgroundPacing(ShareBudget(share, BURST_NS, clock=clock), draining, sleep, COST),
        clock,
        sleep,
        draining,
    )


def test_a_turn_without_debt_does_not_wait() -> None:
    async def body() -> None:
        paced, _clock, sleep, _ = pacing()
        paced.budget.caller_arrived()
        await paced.turn("m", None)
        assert sleep.slept == [] and paced.waits == 0
        assert paced.budget.level_ns == BURST_NS - COST  # charged the estimate at once

    asyncio.run(body())


def test_waiters_take_their_turns_in_order_at_the_share() -> None:
    async def body() -> None:
        paced, clock, _sleep, _ = pacing(0.02)
        paced.budget.caller_arrived()
        paced.budget.charge(BURST_NS + COST)  # in debt: every request below waits
        done: list[int] = []

        async def one(i: int) -> None:
            await paced.turn("m", None)
            done.append(i)

        start = clock.now
        await asyncio.gather(*(one(i) for i in range(5)))
        assert done == [0, 1, 2, 3, 4]
        # Each turn paid 0.3 ms of debt at 2%: 15 ms apiece.
        assert clock.now - start == pytest.approx(5 * 15 * MS, rel=0.01)
        assert paced.waits == 5 and paced.waiting == 0
        assert paced.waited_ns >= 5 * 15 * MS

    asyncio.run(body())


def test_a_deadline_passing_while_waiting_is_deadline_exceeded() -> None:
    async def body() -> None:
        paced, clock, _sleep, _ = pacing(0.02)
        paced.budget.caller_arrived()
        paced.budget.charge(BURST_NS + 10 * MS)  # 500 ms to wait
        with pytest.raises(DeadlineExceeded, match="loop budget"):
            await paced.turn("m", clock.now + 20 * MS)
        assert paced.waiting == 0
        await paced.turn("m", None)  # the next one is not held up by it

    asyncio.run(body())


def test_draining_answers_the_waiters_unavailable() -> None:
    async def body() -> None:
        paced, _clock, _sleep, draining = pacing(0.02)
        paced.budget.caller_arrived()
        paced.budget.charge(BURST_NS + 10 * MS)
        draining.start()
        results = await asyncio.gather(
            *(paced.turn("m", None) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in results)  # one answer each

    asyncio.run(body())


def test_a_cancelled_waiter_leaves_the_line() -> None:
    """The client went away: its turn and its place go with it."""

    async def body() -> None:
        async def forever(_seconds: float) -> None:
            await asyncio.Event().wait()

        clock = FakeClock()
        paced = BackgroundPacing(
            ShareBudget(0.02, BURST_NS, clock=clock), Draining(), forever, COST
        )
        paced.budget.caller_arrived()
        paced.budget.charge(BURST_NS + 10 * MS)
        waiters = [asyncio.ensure_future(paced.turn("m", None)) for _ in range(2)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert paced.waiting == 2
        for waiter in waiters:
            waiter.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert paced.waiting == 0 and not paced._turns.locked()

    asyncio.run(body())
