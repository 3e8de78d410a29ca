"""The rollout replay gate: a Start that carries one replays captured traffic on the
candidate first (a fake replay hook here; tests/test_e2e_rollouts.py has the real one)."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from convoy.api.admin import spec_from_proto, status_to_proto
from convoy.errors import ConfigError, FailedPrecondition, InvalidInput
from convoy.rollouts.analysis import Rollout
from convoy.rollouts.cli import (
    add_rollout_parser,
    run_rollout_command,
    start_request,
    status_json,
)
from convoy.rollouts.declared import parse_policy
from convoy.rollouts.spec import ReplayGate, make_spec
from tests.test_rollout_controller import make, run

GATE = ReplayGate(since="2026-12-07T05:00:00+00:00", max_diff_rate=0.02)
GATED = make_spec("canary", replay=GATE)


class FakeReplay:
    """Answers with a report that passes or not; records what it was asked."""

    def __init__(self, passed: bool, error: Exception | None = None) -> None:
        self.passed = passed
        self.error = error
        self.calls: list[tuple[str, str, str, ReplayGate]] = []

    async def __call__(
        self, model: str, baseline: str, candidate: str, gate: ReplayGate
    ) -> dict[str, Any]:
        self.calls.append((model, baseline, candidate, gate))
        if self.error is not None:
            raise self.error
        reasons = [] if self.passed else ["diff_rate 1.0000 exceeds 0.02 over noise floor 0"]
        return {"passed": self.passed, "diff_rate": 0.0 if self.passed else 1.0,
                "reasons": reasons, "requests": 40}  # fmt: skip


def test_a_passing_replay_starts_the_rollout_with_its_report() -> None:
    controller, _, _ = make()
    hook = FakeReplay(passed=True)
    controller.replay = hook
    status = run(controller.start("m", "2", GATED))
    assert hook.calls == [("m", "1", "2", GATE)]  # baseline: the version serving now
    assert status.phase == "progressing"
    assert status.replay is not None and status.replay["passed"] is True
    assert controller.status("m")[0].replay == status.replay
    assert controller.route("m") is not None  # the candidate gets its first step


def test_a_failing_replay_refuses_the_start_and_leaves_serving_as_it_was() -> None:
    controller, repo, _ = make()
    controller.replay = FakeReplay(passed=False)
    with pytest.raises(FailedPrecondition, match=r"replay gate refused version 2.*diff_rate"):
        run(controller.start("m", "2", GATED))
    assert repo.pinned["m"] is None  # back to Triton's rule, as before the call
    assert "2" not in repo.loaded["m"] and repo.unloaded == ["2"]  # the start loaded it
    assert controller.route("m") is None
    (refused,) = controller.status("m")
    assert (refused.phase, refused.stable, refused.candidate) == ("refused", "1", "2")
    assert refused.weights == {"1": 100.0}
    assert refused.replay is not None and refused.replay["passed"] is False
    assert "diff_rate" in refused.reason
    assert [s.phase for s in controller.status()] == ["refused"]
    assert controller.events[("m", "replay_refused")] == 1
    # A later start that passes replaces the refusal.
    controller.replay = FakeReplay(passed=True)
    assert run(controller.start("m", "3", GATED)).phase == "progressing"
    assert controller.status("m")[0].candidate == "3"


def test_a_candidate_loaded_before_the_start_stays_loaded_when_refused() -> None:
    controller, repo, _ = make()
    repo.loaded["m"].add("2")
    repo.pinned["m"] = "1"
    controller.replay = FakeReplay(passed=False)
    with pytest.raises(FailedPrecondition):
        run(controller.start("m", "2", GATED))
    assert "2" in repo.loaded["m"] and repo.unloaded == []


def test_without_a_capture_a_replay_gate_is_refused_naming_capture_dir() -> None:
    controller, repo, _ = make()
    assert controller.replay is None
    with pytest.raises(FailedPrecondition, match="--capture-dir"):
        run(controller.start("m", "2", GATED))
    assert "2" not in repo.loaded["m"]
    assert controller.status("m") == []
    assert run(controller.start("m", "2", make_spec("canary"))).replay is None  # no gate


def test_nothing_to_replay_refuses_the_start_and_unloads_the_candidate() -> None:
    controller, repo, _ = make()
    controller.replay = FakeReplay(True, FailedPrecondition("no captured request of 'm'"))
    with pytest.raises(FailedPrecondition, match="no captured request"):
        run(controller.start("m", "2", GATED))
    assert "2" not in repo.loaded["m"] and repo.pinned["m"] is None
    assert controller.status("m") == []


def test_a_declared_rollout_refused_by_its_replay_is_not_replayed_again() -> None:
    controller, _, _ = make()
    hook = FakeReplay(passed=False)
    controller.replay = hook
    with pytest.raises(FailedPrecondition):
        run(controller.start_declared("m", "2", GATED))
    assert run(controller.start_declared("m", "2", GATED)) is None  # the next poll
    assert len(hook.calls) == 1


def test_the_report_survives_a_restart() -> None:
    rollout = Rollout("m", "1", "2", GATED, started_at=0.0, replay={"passed": True})
    assert Rollout.from_record(rollout.to_record(), 5.0).replay == {"passed": True}


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        (ReplayGate(since="yesterday"), "replay_since: 'yesterday'"),
        (ReplayGate(since="1h", until="2h"), "replay_since: 1h must be before"),
        (ReplayGate(since="1h", max_diff_rate=1.5), "replay_max_diff_rate: 1.5"),
        (ReplayGate(since="1h", max_requests=0), "replay_max_requests: 0"),
    ],
)
def test_bad_replay_gates_name_the_field(gate: ReplayGate, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        make_spec("canary", replay=gate)


def test_rollout_json_takes_the_replay_gate() -> None:
    spec = parse_policy(
        {"strategy": "canary", "replay_since": "6h", "replay_max_diff_rate": 0.05}, "r.json"
    )
    assert spec.replay == ReplayGate(since="6h", max_diff_rate=0.05)
    assert parse_policy({"strategy": "canary"}, "r.json").replay is None
    with pytest.raises(ConfigError, match="replay_until: needs replay_since"):
        parse_policy({"strategy": "canary", "replay_until": "1h"}, "r.json")
    with pytest.raises(ConfigError, match="replay_since: 'soon'"):
        parse_policy({"strategy": "canary", "replay_since": "soon"}, "r.json")
    with pytest.raises(ConfigError, match="replay_max_requests: expected a whole number"):
        parse_policy({"strategy": "canary", "replay_since": "1h", "replay_max_requests": 1.5},
                     "r.json")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="convoy")
    add_rollout_parser(top.add_subparsers(dest="command", required=True))
    return top


def test_replay_flags_become_the_request_and_the_spec() -> None:
    args = _parser().parse_args(
        "rollout start m --version 2 --strategy canary --replay-since 2026-12-07T05:00 "
        "--replay-until 2026-12-07T06:00Z --replay-max-diff-rate 0.05".split()
    )
    request = start_request(args)
    assert request.spec.replay_since == "2026-12-07T05:00:00+00:00"
    assert request.spec.replay_until == "2026-12-07T06:00:00+00:00"
    assert not request.spec.HasField("replay_max_requests")
    gate = spec_from_proto(request.spec).replay
    assert gate == ReplayGate(
        since="2026-12-07T05:00:00+00:00", until="2026-12-07T06:00:00+00:00", max_diff_rate=0.05
    )
    ago = start_request(_parser().parse_args("rollout start m --version 2 --strategy canary "
                                             "--replay-since 30m".split()))  # fmt: skip
    assert "T" in ago.spec.replay_since  # resolved here, to an absolute time
    plain = _parser().parse_args("rollout start m --version 2 --strategy canary".split())
    assert spec_from_proto(start_request(plain).spec).replay is None


def test_replay_flags_without_since_are_a_usage_error() -> None:
    args = _parser().parse_args(
        "rollout start m --version 2 --strategy canary --replay-max-diff-rate 0.1".split()
    )
    err = io.StringIO()
    assert run_rollout_command(args, err=err) == 2
    assert "--replay-since" in err.getvalue()


def test_status_json_shows_the_report_under_replay() -> None:
    controller, _, _ = make()
    controller.replay = FakeReplay(passed=True)
    status = run(controller.start("m", "2", GATED))
    document = status_json(status_to_proto(status))
    assert document["replay"]["passed"] is True and document["replay"]["requests"] == 40
    plain, _, _ = make()
    assert status_json(status_to_proto(run(plain.start("m", "2", GATED_OFF))))["replay"] is None


GATED_OFF = make_spec("canary")
