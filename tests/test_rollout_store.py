"""Rollout state survives a restart; the declared policy file is parsed strictly."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from convoy.errors import ConfigError, InternalError, Unavailable
from convoy.rollouts.declared import POLICY_FILENAME, read_policy
from convoy.rollouts.spec import Gates, Strategy, make_spec
from convoy.rollouts.store import RolloutStore
from tests.test_rollout_controller import CANARY, FakeRepository, feed, make, run


class FlakyStore(RolloutStore):
    """A state directory that refuses to write the models in `broken` (a full disk)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.broken: set[str] = set()

    def save(self, record: dict[str, Any]) -> None:
        if record["model"] in self.broken:
            raise OSError(28, "No space left on device")
        super().save(record)

    def saved(self, model: str) -> dict[str, Any]:
        return dict(json.loads(self.path_of(model).read_text()))


class SlowStore(FlakyStore):
    """A disk that takes its time: each save waits until `release` is set."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.threads: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def save(self, record: dict[str, Any]) -> None:
        self.threads.append(threading.get_ident())
        self.release.wait(2)
        super().save(record)


def failing_v2(version: str, i: int) -> tuple[InternalError | None, float, float]:
    return (InternalError("boom") if version == "2" else None), 1.0, 10.0


def _advance_to_second_step(tmp_path: Path) -> RolloutStore:
    store = RolloutStore(tmp_path / "state")
    controller, _, clock = make(store=store)
    run(controller.start("m", "2", CANARY))
    feed(controller, 2000)
    clock.now += 30
    run(controller.tick())
    assert controller.status("m")[0].weights["2"] == 25.0
    return store


def test_a_restart_mid_canary_resumes_at_the_same_step(tmp_path: Path) -> None:
    store = _advance_to_second_step(tmp_path)
    # After the restart the repository applied Triton's rule: only the latest, v2, is loaded.
    repo = FakeRepository(loaded={"m": {"2"}})
    controller, _, clock = make(repo, RolloutStore(store.directory))
    run(controller.restore())
    status = controller.status("m")[0]
    assert (status.phase, status.step, status.weights) == ("progressing", 2, {"1": 75.0, "2": 25.0})
    assert repo.pinned["m"] == "1" and "1" in repo.loaded["m"]
    assert status.windows["2"].requests == 0  # fresh windows: nothing judged on old figures
    assert controller.events[("m", "restored")] == 1
    # And it carries on from there.
    for _ in range(3):
        feed(controller, 2000)
        clock.now += 30
        run(controller.tick())
    assert controller.status("m")[0].phase == "promoted"


def test_a_rolled_back_candidate_stays_out_after_a_restart(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path)
    controller, _, _ = make(store=store)
    run(controller.start("m", "3", CANARY))
    run(controller.rollback("m"))
    # v3 is the latest on disk: Triton's rule alone would serve it to everyone.
    repo = FakeRepository(loaded={"m": {"3"}})
    restarted, _, _ = make(repo, store)
    run(restarted.restore())
    assert repo.pinned["m"] == "1" and "1" in repo.loaded["m"]
    assert restarted.route("m") is None
    assert restarted.status("m")[0].phase == "rolled_back"


def test_a_candidate_that_no_longer_loads_after_restart_rolls_back(tmp_path: Path) -> None:
    store = _advance_to_second_step(tmp_path)
    repo = FakeRepository(fail_load={"2"})
    controller, _, _ = make(repo, store)
    run(controller.restore())
    status = controller.status("m")[0]
    assert status.phase == "rolled_back"
    assert "candidate version 2 failed to load after restart" in status.reason
    assert repo.pinned["m"] == "1" and controller.route("m") is None


def test_state_files_are_replaced_whole(tmp_path: Path) -> None:
    store = _advance_to_second_step(tmp_path)
    files = sorted(p.name for p in store.directory.iterdir())
    assert files == ["m.rollout.json"]  # no temporary left behind
    record = json.loads((store.directory / files[0]).read_text())
    assert (record["format"], record["phase"], record["step"]) == (1, "progressing", 1)
    assert record["spec"]["gates"]["min_requests"] == 50


def test_a_start_that_cannot_be_saved_is_refused_and_serving_is_unchanged(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")
    store = RolloutStore(tmp_path / "file" / "state")  # mkdir fails, whoever runs it
    controller, repo, _ = make(store=store)
    with pytest.raises(Unavailable, match=r"cannot be saved in .*file/state.*--rollout-state-dir"):
        run(controller.start("m", "2", CANARY))
    assert controller.route("m") is None and controller.status("m") == []
    assert repo.pinned["m"] is None  # back to Triton's rule
    assert repo.loaded["m"] == {"1"}  # the candidate this call loaded is unloaded again
    assert controller.events == {}


def test_operator_changes_that_cannot_be_saved_are_refused(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path)
    controller, _, _ = make(store=store)
    run(controller.start("m", "2", CANARY))
    store.broken.add("m")
    for call in (controller.promote, controller.pause):
        with pytest.raises(Unavailable, match="No space left on device"):
            run(call("m"))
    status = controller.status("m")[0]
    assert (status.phase, status.weights) == ("progressing", {"1": 95.0, "2": 5.0})
    assert {controller.route("m") for _ in range(500)} == {"1", "2"}  # still the canary
    assert store.saved("m")["phase"] == "progressing"


def test_a_save_failing_for_one_model_holds_up_no_other(tmp_path: Path) -> None:
    repo = FakeRepository(
        on_disk={"a": ["1", "2"], "b": ["1", "2"]}, loaded={"a": {"1"}, "b": {"1"}}
    )
    store = FlakyStore(tmp_path)
    controller, _, clock = make(repo, store)
    run(controller.start("a", "2", CANARY))
    run(controller.start("b", "2", CANARY))
    store.broken.add("a")
    feed(controller, 2000, model="a")  # healthy: its next step is due
    feed(controller, 2000, failing_v2, model="b")
    clock.now += 30
    run(controller.tick())
    assert controller.status("b")[0].phase == "rolled_back" and controller.route("b") is None
    assert store.saved("b")["phase"] == "rolled_back"
    # a's step could not be saved: not taken, serving as it was, tried again next tick.
    assert controller.status("a")[0].weights == {"1": 95.0, "2": 5.0}
    assert store.saved("a")["step"] == 0
    store.broken.clear()
    run(controller.tick())
    assert controller.status("a")[0].weights == {"1": 75.0, "2": 25.0}
    assert store.saved("a")["step"] == 1


def test_a_rollback_goes_back_to_stable_even_when_it_cannot_be_saved(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path)
    controller, repo, _ = make(store=store)
    run(controller.start("m", "2", CANARY))
    store.broken.add("m")
    feed(controller, 2000, failing_v2)
    run(controller.tick())
    # The safety net does not wait on the disk: callers are back on stable at once.
    assert controller.status("m")[0].phase == "rolled_back"
    assert controller.route("m") is None and repo.pinned["m"] == "1"
    assert store.saved("m")["phase"] == "progressing"
    run(controller.tick())  # still broken: retried, nothing else happens
    store.broken.clear()
    run(controller.tick())
    assert store.saved("m")["phase"] == "rolled_back"


def test_state_is_written_off_the_event_loop_and_before_routing_changes(
    tmp_path: Path,
) -> None:
    store = SlowStore(tmp_path)
    controller, _, _ = make(store=store)

    async def scenario() -> None:
        await controller.start("m", "2", CANARY)
        store.release.clear()
        promoting = asyncio.create_task(controller.promote("m"))
        await asyncio.sleep(0.1)  # the loop serves on while the save waits on the disk
        assert not promoting.done()
        assert controller.status("m")[0].phase == "progressing"  # not applied before saved
        assert {controller.route("m") for _ in range(500)} == {"1", "2"}
        store.release.set()
        assert (await promoting).phase == "promoted"
        assert controller.route("m") is None and store.saved("m")["phase"] == "promoted"

    run(scenario())
    assert store.threads and threading.get_ident() not in store.threads


def test_an_unreadable_state_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.rollout.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"m\.rollout\.json: <file>: unreadable"):
        RolloutStore(tmp_path).load_all()
    (tmp_path / "m.rollout.json").write_text('{"format": 99}')
    with pytest.raises(ConfigError, match="format"):
        RolloutStore(tmp_path).load_all()


# -- declared policy -------------------------------------------------------------------


def _policy(tmp_path: Path, data: object) -> Path:
    (tmp_path / POLICY_FILENAME).write_text(json.dumps(data) if not isinstance(data, str) else data)
    return tmp_path


def test_no_policy_file_means_no_declared_rollout(tmp_path: Path) -> None:
    assert read_policy(tmp_path) is None


def test_a_declared_canary_is_parsed(tmp_path: Path) -> None:
    spec = read_policy(
        _policy(
            tmp_path,
            {
                "strategy": "canary",
                "steps": [10, 50, 100],
                "step_interval": "1m",
                "max_p99_ms": 40,
                "max_divergence": 0.001,
                "min_requests": 200,
                "keep_warm": "10m",
            },
        )
    )
    assert spec == make_spec(
        "canary",
        steps=(10.0, 50.0, 100.0),
        step_interval_s=60.0,
        gates=Gates(max_error_rate=0.01, max_p99_ms=40, max_divergence=0.001, min_requests=200),
        keep_warm_s=600.0,
    )
    assert spec is not None and spec.strategy is Strategy.CANARY and spec.shadow_fraction == 0.05


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ("{oops", "<file>", "not valid JSON"),
        ([1, 2], "<file>", "expected a JSON object"),
        ({"steps": [5, 100]}, "strategy", "missing"),
        ({"strategy": "canary", "max_p99": 40}, "max_p99", "unknown field"),
        ({"strategy": "canary", "steps": "5,100"}, "steps", "expected a list"),
        ({"strategy": "canary", "steps": [5, 200]}, "steps", "out of range"),
        ({"strategy": "canary", "min_requests": "100"}, "min_requests", "whole number"),
        ({"strategy": "canary", "max_error_rate": 5}, "max_error_rate", "not between 0 and 1"),
        ({"strategy": "canary", "step_interval": "soon"}, "step_interval", "not a duration"),
        ({"strategy": "rainbow"}, "strategy", "not one of"),
    ],
)
def test_declared_policy_errors_name_file_and_field(
    tmp_path: Path, data: object, field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        read_policy(_policy(tmp_path, data))
    assert info.value.path == str(tmp_path / POLICY_FILENAME)
    assert info.value.field == field
    assert problem in info.value.problem
