"""RolloutController: control input, routing, shadow budget, with a fake repository.

The fakes here are shared by the other test_rollout_* modules.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytest

from convoy.errors import ConfigError, ConvoyError, InternalError, InvalidInput, ModelNotFound
from convoy.rollouts.controller import RolloutController
from convoy.rollouts.spec import Gates, make_spec
from convoy.rollouts.store import RolloutStore

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeRepository:
    """Triton's default rule: the highest loaded version, unless pinned."""

    on_disk: dict[str, list[str]] = field(default_factory=lambda: {"m": ["1", "2", "3"]})
    loaded: dict[str, set[str]] = field(default_factory=lambda: {"m": {"1"}})
    pinned: dict[str, str | None] = field(default_factory=dict)
    fail_load: set[str] = field(default_factory=set)
    unloaded: list[str] = field(default_factory=list)

    def versions_on_disk(self, model: str) -> list[str]:
        if model not in self.on_disk:
            raise ModelNotFound(f"model '{model}' is not in the repository")
        return self.on_disk[model]

    def loaded_versions(self, model: str) -> list[str]:
        return sorted(self.loaded.get(model, set()), key=int)

    def default_version(self, model: str) -> str:
        return self.pinned.get(model) or max(self.loaded[model], key=int)

    def set_default(self, model: str, version: str | None) -> None:
        self.pinned[model] = version

    def pinned_default(self, model: str) -> str | None:
        return self.pinned.get(model)

    async def ensure_loaded(self, model: str, version: str) -> None:
        if version in self.fail_load:
            raise ConfigError(f"/repo/{model}", "model file", f"version {version} is corrupt")
        self.loaded.setdefault(model, set()).add(version)

    async def unload_version(self, model: str, version: str) -> None:
        self.loaded[model].discard(version)
        self.unloaded.append(version)


Behaviour = Callable[[str, int], tuple[ConvoyError | None, float, float]]


def healthy(version: str, i: int) -> tuple[ConvoyError | None, float, float]:
    return None, 1.0, 10.0  # error, queue ms, compute ms


def feed(
    controller: RolloutController, n: int, behaviour: Behaviour = healthy, model: str = "m"
) -> dict[str, int]:
    """n unversioned requests routed and answered; returns how many each version got."""
    counts: dict[str, int] = {}
    for i in range(n):
        version = controller.route(model) or "default"
        counts[version] = counts.get(version, 0) + 1
        error, queue_ms, compute_ms = behaviour(version, i)
        controller.record(model, version, error, int(queue_ms * 1e6), int(compute_ms * 1e6))
    return counts


def make(
    repo: FakeRepository | None = None, store: RolloutStore | None = None
) -> tuple[RolloutController, FakeRepository, FakeClock]:
    repo = repo or FakeRepository()
    clock = FakeClock()
    return RolloutController(repo, store, clock, random.Random(0), shadow_inflight=2), repo, clock


CANARY = make_spec("canary", step_interval_s=30, gates=Gates(min_requests=50))


# -- control input ----------------------------------------------------------------------


def test_start_loads_the_candidate_and_pins_stable_first() -> None:
    controller, repo, _ = make()
    status = run(controller.start("m", "2", CANARY))
    assert "2" in repo.loaded["m"]
    assert repo.pinned["m"] == "1"  # the freshly loaded v2 is not "the latest" for anyone
    assert (status.stable, status.candidate, status.phase) == ("1", "2", "progressing")
    assert status.weights == {"1": 95.0, "2": 5.0}
    assert "started canary of version 2 over 1" in status.reason


def test_unknown_model_and_version_are_not_found() -> None:
    controller, _, _ = make()
    with pytest.raises(ModelNotFound, match="'nope'"):
        run(controller.start("nope", "2", CANARY))
    with pytest.raises(ModelNotFound, match=r"no version 9 .*1, 2, 3"):
        run(controller.start("m", "9", CANARY))
    with pytest.raises(ModelNotFound):
        controller.status("nope")
    assert controller.status("m") == []


def test_two_rollouts_on_one_model_are_refused() -> None:
    controller, _, _ = make()
    run(controller.start("m", "2", CANARY))
    with pytest.raises(InvalidInput, match="already has a canary rollout of version 2"):
        run(controller.start("m", "3", CANARY))
    assert controller.status("m")[0].candidate == "2"


def test_the_default_version_cannot_be_its_own_candidate() -> None:
    controller, _, _ = make()
    with pytest.raises(InvalidInput, match="already serves by default"):
        run(controller.start("m", "1", CANARY))


def test_a_candidate_that_fails_to_load_leaves_serving_as_it_was() -> None:
    controller, repo, _ = make()
    repo.fail_load.add("2")
    with pytest.raises(ConfigError, match="version 2 is corrupt"):
        run(controller.start("m", "2", CANARY))
    assert repo.pinned["m"] is None  # back to Triton's rule
    assert controller.route("m") is None
    assert controller.status("m") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "linear"}, "strategy: 'linear' is not one of"),
        ({"strategy": "canary", "steps": (5.0, 150.0)}, "weight 150 is out of range"),
        ({"strategy": "canary", "steps": (50.0, 25.0, 100.0)}, "must rise strictly"),
        ({"strategy": "canary", "steps": (5.0, 50.0)}, "end at 100"),
        ({"strategy": "ab", "steps": (120.0,)}, "out of range"),
        ({"strategy": "blue-green", "steps": (5.0, 100.0)}, "blue-green switches 100%"),
        ({"strategy": "shadow", "shadow_fraction": 0.0}, "needs a fraction above 0"),
        ({"strategy": "shadow", "shadow_fraction": 1.5}, "shadow_fraction: 1.5"),
        ({"strategy": "canary", "gates": Gates(max_error_rate=2.0)}, "max_error_rate: 2.0"),
        ({"strategy": "canary", "gates": Gates(min_requests=0)}, "min_requests: 0"),
        ({"strategy": "canary", "step_interval_s": 0}, "step_interval"),
    ],
)
def test_bad_rollout_specs_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    strategy = kwargs.pop("strategy")
    with pytest.raises(InvalidInput, match=message):
        make_spec(strategy, **kwargs)


def test_operator_calls_on_a_model_without_rollout_are_refused() -> None:
    controller, _, _ = make()
    for call in (controller.promote, controller.rollback, controller.pause, controller.resume):
        with pytest.raises(InvalidInput, match="has no rollout"):
            run(call("m"))
    with pytest.raises(ModelNotFound):
        run(controller.promote("nope"))


def test_weights_of_ab_change_live_and_are_validated() -> None:
    controller, _, _ = make()
    with pytest.raises(InvalidInput, match="only an ab rollout takes a weight"):
        run(controller.start("m", "2", CANARY))
        run(controller.set_weight("m", 40))
    controller, _, _ = make()
    run(controller.start("m", "2", make_spec("ab")))
    with pytest.raises(InvalidInput, match="weight: 120 is out of range"):
        run(controller.set_weight("m", 120))
    assert run(controller.set_weight("m", 40)).weights == {"1": 60.0, "2": 40.0}


# -- routing and recording ----------------------------------------------------------------


def test_a_model_without_rollout_routes_to_the_repository_default() -> None:
    controller, _, _ = make()
    assert controller.route("m") is None
    controller.record("m", "1", None, 1, 1)  # ignored, no error


def test_client_mistakes_do_not_count_against_a_version() -> None:
    controller, _, _ = make()
    run(controller.start("m", "2", CANARY))
    controller.record("m", "2", InvalidInput("bad shape"), 0, 0)
    controller.record("m", "2", ModelNotFound("no such output"), 0, 0)
    controller.record("m", "2", InternalError("backend crashed"), 0, 0)
    controller.record("m", "2", None, 2_000_000, 5_000_000)
    window = controller.status("m")[0].windows["2"]
    assert (window.requests, window.errors) == (2, 1)
    assert window.queue_p99_ms == pytest.approx(2.0)
    assert window.compute_p99_ms == pytest.approx(5.0)


def test_shadow_work_is_bounded_and_shed_first() -> None:
    controller, _, _ = make()
    spec = make_spec("shadow", shadow_fraction=1.0)
    run(controller.start("m", "2", spec))
    assert {controller.route("m") for _ in range(200)} == {"1"}  # the caller always gets stable
    assert controller.mirror("m", "1") == "2"
    assert controller.mirror("m", "1") == "2"
    assert controller.mirror("m", "1") is None  # budget of 2 in flight spent
    assert controller.status("m")[0].windows["2"].shadow_shed == 1
    assert controller.shadow_shed[("m", "2")] == 1
    controller.mirror_done("m")
    assert controller.mirror("m", "1") == "2"


def test_comparisons_feed_the_candidate_window_and_histogram() -> None:
    controller, _, _ = make()
    run(controller.start("m", "2", make_spec("shadow", shadow_fraction=1.0)))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    divergences = controller.record_comparison("m", {"2": {"y": 3 * x}, "1": {"y": 2 * x}})
    assert divergences["y"].max_abs_diff == pytest.approx(5.0)
    window = controller.status("m")[0].windows["2"]
    assert window.compared == 1 and window.max_divergence == pytest.approx(5.0)
    assert controller.divergence[("m", "2", "y")].observations == 1
    assert controller.record_comparison("m", {"1": {"y": x}}) == {}  # one side only: nothing


def test_blue_green_compares_against_the_warm_stable() -> None:
    controller, _, _ = make()
    spec = make_spec("blue-green", gates=Gates(max_divergence=0.01))
    assert spec.shadow_fraction == 0.05
    run(controller.start("m", "2", spec))
    mirrored = {controller.mirror("m", "2") for _ in range(200)}
    assert mirrored == {"1", None}


# -- declared rollouts ---------------------------------------------------------------


def test_a_declared_rollout_starts_once_for_a_new_version() -> None:
    controller, repo, _ = make()
    spec = make_spec("canary")
    assert run(controller.start_declared("m", "1", spec)) is None  # already the default
    status = run(controller.start_declared("m", "2", spec))
    assert status is not None and status.candidate == "2"
    assert run(controller.start_declared("m", "3", spec)) is None  # one rollout at a time
    run(controller.rollback("m"))
    assert run(controller.start_declared("m", "2", spec)) is None  # not retried after rollback
    assert repo.pinned["m"] == "1"
    assert run(controller.start_declared("m", "3", spec)) is not None


def test_a_new_rollout_unloads_the_previous_ones_warm_loser() -> None:
    controller, repo, _ = make()
    run(controller.start("m", "2", CANARY))
    run(controller.promote("m"))  # v1 kept warm
    run(controller.start("m", "3", CANARY))  # v2 is now stable; v1 has no reason to stay
    assert repo.unloaded == ["1"]
    assert repo.pinned["m"] == "2"


def test_what_the_server_asks_before_routing_and_reloading() -> None:
    controller, _, clock = make()
    assert not controller.needs_key("m") and controller.versions_in_use("m") == set()
    run(controller.start("m", "2", make_spec("ab")))
    assert controller.needs_key("m")
    assert controller.versions_in_use("m") == {"1", "2"}
    run(controller.promote("m"))
    assert not controller.needs_key("m")
    assert controller.versions_in_use("m") == {"1", "2"}  # v1 kept warm
    clock.now += 300
    run(controller.tick())
    assert controller.versions_in_use("m") == {"2"}


def test_a_draining_version_holds_up_no_other_rollout() -> None:
    """Retiring a loser drains its queue (up to the grace period): the ticks go on
    meanwhile, and a failing candidate elsewhere is rolled back at once."""
    repo = FakeRepository(
        on_disk={"a": ["1", "2"], "b": ["1", "2"]}, loaded={"a": {"1"}, "b": {"1"}}
    )
    controller, _, clock = make(repo)
    unload = repo.unload_version

    async def scenario() -> None:
        drained = asyncio.Event()

        async def slow_unload(model: str, version: str) -> None:
            await drained.wait()
            await unload(model, version)

        repo.unload_version = slow_unload  # type: ignore[method-assign]
        await controller.start("a", "2", CANARY)
        await controller.promote("a")
        await controller.start("b", "2", CANARY)
        clock.now += 300  # a's keep-warm is over: v1 drains
        await asyncio.wait_for(controller.tick(), 1)
        assert controller.versions_in_use("a") == {"2"}  # retiring: a reload drops v1
        feed(controller, 2000, lambda v, i: (InternalError("x") if v == "2" else None, 1, 1), "b")
        await asyncio.wait_for(controller.tick(), 1)
        assert controller.status("b")[0].phase == "rolled_back"
        drained.set()
        for _ in range(100):
            if controller.events.get(("a", "retired")):
                break
            await asyncio.sleep(0.01)
        assert repo.unloaded == ["1"] and controller.events[("a", "retired")] == 1
        # A retirement still draining at shutdown is cancelled by its owner.
        drained.clear()
        clock.now += 300  # b's loser, v2, starts draining
        await controller.tick()
        await asyncio.sleep(0)
        await asyncio.wait_for(controller.close(), 1)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(scenario())


def test_a_candidate_that_no_longer_serves_is_rolled_back_at_once() -> None:
    """Its version directory left the repository and a reload dropped it: unversioned
    requests go back to stable when the repository says so, or at the next tick."""
    for told in (False, True):
        controller, repo, _ = make()
        run(controller.start("m", "2", CANARY))
        repo.on_disk["m"] = ["1", "3"]
        repo.loaded["m"].discard("2")
        if told:  # the repository's change hook, in the same step as its reload
            controller.versions_changed("m")
        else:
            run(controller.tick())
        status = controller.status("m")[0]
        assert status.phase == "rolled_back", told
        assert "candidate version 2 no longer serves" in status.reason
        assert controller.route("m") is None and repo.pinned["m"] == "1"
        assert controller.events[("m", "rolled_back")] == 1


def test_concurrent_declared_starts_start_one_rollout_and_refuse_none() -> None:
    """The poll and a RepositoryModelLoad see the same new version at once: one starts
    its declared rollout, the other is the documented no-op, not an error."""
    controller, repo, _ = make()
    spec = make_spec("canary")
    load = repo.ensure_loaded

    async def slow_load(model: str, version: str) -> None:
        await asyncio.sleep(0.01)  # loading and warming up takes a while
        await load(model, version)

    repo.ensure_loaded = slow_load  # type: ignore[method-assign]

    async def both() -> list[Any]:
        return await asyncio.gather(
            controller.start_declared("m", "2", spec), controller.start_declared("m", "2", spec)
        )

    first, second = run(both())
    assert first is not None and first.candidate == "2" and second is None
    assert controller.events[("m", "started")] == 1
    assert controller.status("m")[0].phase == "progressing"
