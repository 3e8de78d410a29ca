"""The server's own burn rates (monitoring/burn.py) with a fake clock: what counts as a
good or bad event, each window's burn rate, the fast-burn condition and the shedding of
background work it causes; and the metrics they are exported as."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client.exposition import generate_latest

from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    Unavailable,
)
from convoy.inference.caller import Caller
from convoy.inference.path import BuildRequest, InferencePath
from convoy.metrics import Metrics
from convoy.monitoring.burn import SloTracker
from convoy.monitoring.objectives import parse_objectives
from convoy.repository.manager import ModelRepository
from convoy.repository.ondemand import OnDemandLoader

DECLARED = {
    "objectives": [
        {"name": "availability", "kind": "availability", "target": 99.0},
        {"name": "fast", "kind": "latency", "target": 90.0, "threshold_ms": 50},
        {"name": "drift_free", "kind": "quality", "target": 95.0},
    ]
}


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Answer:
    served: SimpleNamespace
    arm: str
    request: SimpleNamespace | None
    error: ConvoyError | None
    done_ns: int


@dataclass
class Fixture:
    clock: Clock = field(default_factory=Clock)
    tracker: SloTracker = field(init=False)

    def __post_init__(self) -> None:
        declared = {"m": parse_objectives(DECLARED, "slo.yaml", "m")}
        self.tracker = SloTracker(declared, clock=self.clock, interval_s=10.0)

    def answer(
        self,
        error: ConvoyError | None = None,
        ms: float = 1.0,
        *,
        model: str = "m",
        background: bool = False,
        arm: str = "stable",
        n: int = 1,
    ) -> None:
        request = SimpleNamespace(background=background, arrival_ns=0)
        served = SimpleNamespace(spec=SimpleNamespace(name=model))
        for _ in range(n):
            self.tracker.observe(Answer(served, arm, request, error, int(ms * 1e6)))

    def advance(self, seconds: float) -> None:
        """Time passes in 1 s ticks, as the server's ticker runs."""
        for _ in range(int(seconds)):
            self.clock.now += 1.0
            self.tracker.tick()

    def reading(self, slo: str) -> tuple[int, int, dict[str, float]]:
        r = next(r for r in self.tracker.readings if r.slo == slo)
        assert r.counts is not None
        return r.counts.good, r.counts.bad, dict(r.counts.burn_rates)


def test_server_failures_spend_the_budget_and_client_mistakes_do_not() -> None:
    f = Fixture()
    f.answer(n=10)
    for error in (InternalError("x"), Unavailable("x"), ModelNotReady("x"), DeadlineExceeded("x")):
        f.answer(error)
    for error in (InvalidInput("x"), Cancelled("x"), Overloaded("x")):
        f.answer(error)
    f.answer(InternalError("shadow"), arm="shadow")  # a shadow copy is not a caller's request
    f.answer(InternalError("replay"), background=True)
    f.answer(InternalError("other model"), model="unknown")
    f.tracker.tick()
    good, bad, rates = f.reading("availability")
    assert (good, bad) == (10, 4)
    assert rates["5m"] == pytest.approx((4 / 14) / 0.01)


def test_latency_counts_answers_over_the_threshold() -> None:
    f = Fixture()
    f.answer(ms=49.0, n=8)
    f.answer(ms=51.0, n=2)
    f.answer(InternalError("x"), ms=500.0)  # a failure is availability's, not latency's
    f.tracker.tick()
    good, bad, rates = f.reading("fast")
    assert (good, bad) == (8, 2)
    assert rates["1h"] == pytest.approx(0.2 / 0.1)
    counted = {r.slo for r in f.tracker.readings if r.counts is not None}
    assert counted == {"availability", "fast"}  # quality: counted by Prometheus


def test_windows_forget_what_is_older_than_them() -> None:
    f = Fixture()
    f.answer(InternalError("x"), n=10)  # an outage...
    f.advance(600)  # ...10 minutes ago, then only successes
    f.answer(n=100)
    f.advance(1)
    _, _, rates = f.reading("availability")
    assert rates["5m"] == 0.0
    assert rates["30m"] == pytest.approx((10 / 110) / 0.01)
    assert rates["1h"] == rates["6h"] == rates["30m"]


def test_no_events_is_no_burn() -> None:
    f = Fixture()
    f.advance(30)
    assert f.reading("availability")[2] == {"5m": 0.0, "30m": 0.0, "1h": 0.0, "6h": 0.0}


def test_fast_burn_sheds_background_work_and_counts_it() -> None:
    f = Fixture()
    f.answer(n=90)
    f.answer(InternalError("x"), n=10)  # 10% of 1% budget: 10x, under 14.4x
    f.advance(1)
    assert f.tracker.refuse_background("m") is None
    f.answer(InternalError("x"), n=10)  # 20 of 110: 18x over both windows
    f.advance(1)
    refused = f.tracker.refuse_background("m")
    assert isinstance(refused, Unavailable)
    assert "background work shed" in refused.message
    assert "SLO 'availability'" in refused.message and "over 14.4x" in refused.message
    assert f.tracker.refuse_background("other") is None
    assert f.tracker.shed == {("m", "fast_burn"): 1}
    f.advance(400)  # 5 minutes of successes: the short window clears, shedding stops
    f.answer(n=1000)
    f.advance(1)
    assert f.reading("availability")[2]["5m"] == 0.0
    assert f.tracker.refuse_background("m") is None


def test_exported_series() -> None:
    f = Fixture()
    metrics = Metrics()
    metrics.slos.watch(lambda: f.tracker.readings, lambda: dict(f.tracker.shed))
    f.answer(n=3)
    f.answer(InternalError("x"))
    f.tracker.tick()
    f.tracker.shed[("m", "fast_burn")] = 2
    text = generate_latest(metrics.registry).decode()
    assert 'convoy_slo_objective{model="m",slo="availability"} 0.99' in text
    assert 'convoy_slo_events_total{good="true",model="m",slo="availability"} 3.0' in text
    assert 'convoy_slo_events_total{good="false",model="m",slo="availability"} 1.0' in text
    assert 'convoy_slo_burn_rate{model="m",slo="availability",window="5m"} 25.0' in text
    assert 'convoy_slo_burn_rate{model="m",slo="fast",window="6h"} 0.0' in text
    assert 'convoy_slo_objective{model="m",slo="drift_free"} 0.95' in text
    assert (
        'slo="drift_free",window' not in text
        and 'good="true",model="m",slo="drift_free"' not in text
    )
    assert 'convoy_slo_shed_total{model="m",reason="fast_burn"} 2.0' in text


def test_refusals_before_a_version_is_picked_spend_the_availability_budget() -> None:
    f = Fixture()
    f.answer(n=6)
    f.tracker.record_refused("m", ModelNotReady("load failed"), background=False)
    f.tracker.record_refused("m", DeadlineExceeded("load wait over"), background=False)
    f.tracker.record_refused("m", ModelNotFound("x"), background=False)  # the caller's mistake
    f.tracker.record_refused("m", Overloaded("x"), background=False)  # excluded: its excess
    f.tracker.record_refused("m", ModelNotReady("x"), background=True)  # background work
    f.tracker.record_refused("unknown", ModelNotReady("x"), background=False)
    f.tracker.tick()
    assert f.reading("availability")[:2] == (6, 2)
    assert f.reading("fast")[:2] == (6, 0)  # no answer, no request time


class _NotReady:
    """A repository whose model is down (its load failed)."""

    def get(self, name: str, version: str = "") -> None:
        raise ModelNotReady(f"model '{name}' is not ready: load failed")


class _LoadWaitOver:
    """An on-demand loader whose load outlasts every request's wait."""

    @contextlib.asynccontextmanager
    async def held(self, name: str, wait_s: float | None) -> AsyncIterator[None]:
        raise DeadlineExceeded(f"model '{name}' did not load in time")
        yield


def _path(tracker: SloTracker) -> InferencePath:
    path = InferencePath(cast(ModelRepository, _NotReady()))
    path.slos = tracker
    return path


def test_the_path_counts_a_model_that_is_down_against_its_objectives() -> None:
    f = Fixture()
    path = _path(f.tracker)

    async def ask(background: bool = False) -> None:
        build = cast(BuildRequest, lambda model: None)
        await path.run("m", "", build, Caller("grpc", background=background))

    for background in (False, False, True):
        with pytest.raises(ModelNotReady):
            asyncio.run(ask(background))
    path.on_demand = cast(OnDemandLoader, _LoadWaitOver())
    with pytest.raises(DeadlineExceeded):
        asyncio.run(ask())
    f.tracker.tick()
    good, bad, rates = f.reading("availability")
    assert (good, bad) == (0, 3)  # two not ready, one load wait over; background: none
    assert rates["5m"] == pytest.approx(1.0 / 0.01)
