"""The rollout state machine: one plain object per rollout, advanced by a clock.

Phases (Flagger's and Argo Rollouts' shape): progressing -> promoted, or
progressing -> rolled_back, with paused as a hold. Gates are data (spec.Gates);
evaluate() turns two same-window snapshots into pass, fail or inconclusive.
"Inconclusive" is a state of its own: too few requests never promotes and never
rolls back (an empty window is those tools' most reported false rollback).

Nothing here does I/O: tick() and the operator methods return Transitions,
and the controller applies them (repository, routes, store, metrics, log).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..monitoring.objectives import Objective
from .policy import TrafficPolicy
from .spec import Gates, Phase, RolloutSpec, Strategy
from .window import VersionWindow, WindowStats


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str  # names the gate and the measured figure


@dataclass(frozen=True)
class Transition:
    event: str  # started, step, inconclusive, promoted, rolled_back, paused, resumed, ...
    phase: Phase  # the phase after it
    reason: str


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


# Both versions over a gate in the same window points at the host or a shared
# dependency, not the candidate; it is blamed only when clearly worse than stable:
# errors: a two-proportion z-test, one-sided p ~ 2e-4. Strict because the gates are
# checked at every tick on a growing window: at 1% the repeated looks would add up
# to a false rollback in several percent of healthy steps.
Z_CRITICAL = 3.5
SLOWER = 1.5  # latency: this many times stable's p99


def _stable_judged(stable: WindowStats | None, gates: Gates) -> bool:
    return stable is not None and stable.requests >= gates.min_requests


def _blame_errors(candidate: WindowStats, stable: WindowStats | None, gates: Gates) -> bool:
    assert gates.max_error_rate is not None
    judged = stable is not None and _stable_judged(stable, gates)
    if candidate.requests < gates.min_requests:
        # Early errors are decisive only against a stable judged healthy in the same
        # window; before that they may be the host's, and the window must fill.
        return judged and stable is not None and stable.error_rate <= gates.max_error_rate
    if stable is None or not judged or stable.error_rate <= gates.max_error_rate:
        return True
    pooled = (candidate.errors + stable.errors) / (candidate.requests + stable.requests)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / candidate.requests + 1 / stable.requests))
    return spread > 0 and (candidate.error_rate - stable.error_rate) / spread > Z_CRITICAL


def _blame_latency(mine: float, theirs: float | None, limit: float, judged: bool) -> bool:
    return not judged or theirs is None or theirs <= limit or mine > SLOWER * theirs


def _judge_burn(
    limit: float,
    candidate: WindowStats,
    stable: WindowStats | None,
    enough: bool,
    gates: Gates,
    passes: list[str],
    failures: list[str],
) -> None:
    """max_burn_rate: the candidate's worst SLO burn rate in this window. Blamed on the
    candidate as latency is: unless stable, judged in the same window, burns as fast."""
    mine = candidate.burn_rate
    assert mine is not None
    theirs = stable.burn_rate if stable is not None else None
    note = f" (stable {theirs:.1f}x)" if theirs is not None and stable and stable.requests else ""
    figure = (
        f"burn rate {mine:.1f}x of SLO '{candidate.burn_slo}' over {candidate.burn_events} "
        f"events{note}"
    )
    if not enough or mine <= limit:
        passes.append(f"{figure} <= {limit:g}")
    elif _blame_latency(mine, theirs, limit, _stable_judged(stable, gates)):
        failures.append(f"{figure} > max_burn_rate {limit:g}")
    else:
        passes.append(f"{figure}: stable burns as fast in the same window, not the candidate")


def evaluate(gates: Gates, candidate: WindowStats, stable: WindowStats | None) -> Verdict:
    """Judge the candidate's window against the gates and stable's same window."""
    enough = candidate.requests >= gates.min_requests
    failures: list[str] = []
    passes: list[str] = []
    if gates.max_error_rate is not None:
        rate = candidate.error_rate
        stable_note = f" (stable {stable.error_rate:.4f})" if stable and stable.requests else ""
        figure = f"error_rate {rate:.4f} over {candidate.requests} requests{stable_note}"
        # Decisive before min_requests: even all-successful requests to come could
        # not bring the rate under the gate.
        decisive = candidate.errors > gates.max_error_rate * gates.min_requests
        if not (enough or decisive) or rate <= gates.max_error_rate:
            passes.append(f"{figure} <= {gates.max_error_rate:g}")
        elif _blame_errors(candidate, stable, gates):
            failures.append(f"{figure} > max_error_rate {gates.max_error_rate:g}")
        else:
            passes.append(f"{figure}: stable as bad in the same window, not the candidate")
    for gate, limit, mine, theirs in (
        (
            "max_p99_ms",
            gates.max_p99_ms,
            candidate.compute_p99_ms,
            stable.compute_p99_ms if stable else None,
        ),
        (
            "max_queue_p99_ms",
            gates.max_queue_p99_ms,
            candidate.queue_p99_ms,
            stable.queue_p99_ms if stable else None,
        ),
    ):
        if limit is None:
            continue
        kind = "compute" if gate == "max_p99_ms" else "queue"
        figure = f"{kind} p99 {_ms(mine)} (stable {_ms(theirs)})"
        if not enough or mine is None or mine <= limit:
            passes.append(f"{figure} <= {limit:g}")
        elif _blame_latency(mine, theirs, limit, _stable_judged(stable, gates)):
            failures.append(f"{figure} > {gate} {limit:g}")
        else:
            passes.append(f"{figure}: stable as slow in the same window, not the candidate")
    if gates.max_burn_rate is not None and candidate.burn_rate is not None:
        _judge_burn(gates.max_burn_rate, candidate, stable, enough, gates, passes, failures)
    if gates.max_divergence is not None:
        worst = candidate.max_divergence
        figure = f"divergence {worst:g} over {candidate.compared} compared"
        # One compared request past the gate is proof enough: outputs do not drift by chance.
        if worst is not None and worst > gates.max_divergence:
            failures.append(f"{figure} > max_divergence {gates.max_divergence:g}")
        elif worst is not None:
            passes.append(f"{figure} <= {gates.max_divergence:g}")
    if failures:
        return Verdict(Outcome.FAIL, "gate failed: " + "; ".join(failures))
    if not enough:
        return Verdict(
            Outcome.INCONCLUSIVE,
            f"inconclusive, hold: {candidate.requests} of min_requests {gates.min_requests} "
            "requests on the candidate in this window",
        )
    if gates.max_divergence is not None and candidate.compared == 0:
        return Verdict(
            Outcome.INCONCLUSIVE, "inconclusive, hold: no compared request for max_divergence"
        )
    return Verdict(Outcome.PASS, "gates passed: " + "; ".join(passes or ["no gate set"]))


@dataclass
class Rollout:
    """One model's rollout. Mutable; owned and driven by the RolloutController."""

    model: str
    stable: str
    candidate: str
    spec: RolloutSpec
    started_at: float  # clock seconds (monotonic: meaningful within one process only)
    phase: Phase = Phase.PROGRESSING
    step: int = 0  # index into spec.steps
    step_started_at: float = 0.0
    reason: str = ""  # why the phase last changed
    analysis: str = ""  # the last verdict
    finished_at: float | None = None  # promoted or rolled back at; keep-warm counts from here
    retired: bool = False  # the losing version has been unloaded
    candidate_was_loaded: bool = True  # False: the rollout loaded it, so it unloads it
    weight_override: float | None = None  # ab: the candidate's share, changed live
    replay: dict[str, Any] | None = None  # the replay gate's report (JSON), if it had one
    windows: dict[str, VersionWindow] = field(default_factory=dict)
    # The model's SLOs, counted in each window where a max_burn_rate gate judges them.
    objectives: tuple[Objective, ...] = ()

    def __post_init__(self) -> None:
        if not self.windows:
            self.windows = {v: self._window() for v in (self.stable, self.candidate)}
        if not self.step_started_at:
            self.step_started_at = self.started_at

    def copy(self) -> Rollout:
        """A copy to change, then commit in place of this one (or drop, if that fails).
        It shares this one's windows until it starts new ones."""
        return copy.copy(self)

    # -- what it routes ------------------------------------------------------------

    def candidate_weight(self) -> float:
        if self.phase is Phase.PROMOTED:
            return 100.0
        if self.phase is Phase.ROLLED_BACK or self.spec.strategy is Strategy.SHADOW:
            return 0.0
        if self.weight_override is not None:
            return self.weight_override
        return self.spec.steps[self.step]

    def weights(self) -> dict[str, float]:
        share = self.candidate_weight()
        return {self.stable: 100.0 - share, self.candidate: share}

    def policy(self) -> TrafficPolicy:
        return TrafficPolicy.from_weights(
            self.weights(),
            salt=self.spec.salt or f"{self.model}:{self.candidate}",
            sticky=self.spec.strategy is Strategy.AB,
        )

    @property
    def winner(self) -> str:
        """The version that serves by default once the rollout has ended (or now)."""
        return self.candidate if self.phase is Phase.PROMOTED else self.stable

    @property
    def loser(self) -> str:
        return self.stable if self.phase is Phase.PROMOTED else self.candidate

    def stats(self) -> dict[str, WindowStats]:
        return {version: window.snapshot() for version, window in self.windows.items()}

    # -- the clock -------------------------------------------------------------------

    def tick(self, now: float) -> list[Transition]:
        if not self.phase.active or self.spec.strategy is Strategy.AB:
            return []  # A/B has no automatic winner; its arms' figures are for people
        verdict = evaluate(
            self.spec.gates,
            self.windows[self.candidate].snapshot(),
            self.windows[self.stable].snapshot(),
        )
        gated = self.spec.strategy in (Strategy.CANARY, Strategy.BLUE_GREEN)
        if gated and verdict.outcome is Outcome.FAIL:
            # At once, even while paused: a pause holds the steps, not the safety net.
            self.analysis = verdict.reason
            return [self._finish(Phase.ROLLED_BACK, now, verdict.reason)]
        if self.phase is Phase.PAUSED or now - self.step_started_at < self.spec.step_interval_s:
            return []
        self.analysis = verdict.reason
        if not gated:  # shadow: report each interval, never act on its own
            event = {
                Outcome.PASS: "analysis_passed",
                Outcome.FAIL: "analysis_failed",
                Outcome.INCONCLUSIVE: "inconclusive",
            }[verdict.outcome]
            self._new_window(now)
            return [Transition(event, self.phase, verdict.reason)]
        if verdict.outcome is Outcome.INCONCLUSIVE:
            # Keep the window: low traffic accumulates until it is enough to judge.
            self.step_started_at = now
            return [Transition("inconclusive", self.phase, verdict.reason)]
        if self.step + 1 >= len(self.spec.steps):
            return [self._finish(Phase.PROMOTED, now, f"all steps passed; {verdict.reason}")]
        self.step += 1
        self._new_window(now)
        reason = (
            f"step {self.step + 1}/{len(self.spec.steps)}: candidate at "
            f"{self.spec.steps[self.step]:g}%; {verdict.reason}"
        )
        return [Transition("step", self.phase, reason)]

    # -- the operator --------------------------------------------------------------

    def pause(self, now: float, reason: str) -> Transition:
        self.phase = Phase.PAUSED
        self.reason = reason
        return Transition("paused", self.phase, reason)

    def resume(self, now: float, reason: str) -> Transition:
        self.phase = Phase.PROGRESSING
        self.reason = reason
        self._new_window(now)  # the paused period's figures judged a held step
        return Transition("resumed", self.phase, reason)

    def promote(self, now: float, reason: str) -> Transition:
        return self._finish(Phase.PROMOTED, now, reason)

    def rollback(self, now: float, reason: str) -> Transition:
        return self._finish(Phase.ROLLED_BACK, now, reason)

    def _finish(self, phase: Phase, now: float, reason: str) -> Transition:
        self.phase = phase
        self.reason = reason
        self.finished_at = now
        self.retired = False
        return Transition(phase.value, phase, reason)

    def _new_window(self, now: float) -> None:
        self.step_started_at = now
        # New objects, not a reset: a copy being committed must not touch the original's.
        self.windows = {version: self._window() for version in self.windows}

    def _window(self) -> VersionWindow:
        return VersionWindow(objectives=self.objectives)

    # -- persistence ---------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """What survives a restart: everything but windows and clock readings."""
        spec = self.spec
        return {
            "model": self.model,
            "stable": self.stable,
            "candidate": self.candidate,
            "phase": self.phase.value,
            "step": self.step,
            "reason": self.reason,
            "analysis": self.analysis,
            "retired": self.retired,
            "candidate_was_loaded": self.candidate_was_loaded,
            "weight_override": self.weight_override,
            "replay": self.replay,
            "spec": {
                "strategy": spec.strategy.value,
                "steps": list(spec.steps),
                "step_interval_s": spec.step_interval_s,
                "gates": {
                    "max_error_rate": spec.gates.max_error_rate,
                    "max_p99_ms": spec.gates.max_p99_ms,
                    "max_queue_p99_ms": spec.gates.max_queue_p99_ms,
                    "max_divergence": spec.gates.max_divergence,
                    "max_burn_rate": spec.gates.max_burn_rate,
                    "min_requests": spec.gates.min_requests,
                },
                "shadow_fraction": spec.shadow_fraction,
                "keep_warm_s": spec.keep_warm_s,
                "salt": spec.salt,
            },
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], now: float) -> Rollout:
        """Inverse of to_record; KeyError/ValueError/TypeError on a malformed record."""
        s = record["spec"]
        spec = RolloutSpec(
            strategy=Strategy(s["strategy"]),
            steps=tuple(float(x) for x in s["steps"]),
            step_interval_s=float(s["step_interval_s"]),
            gates=Gates(**s["gates"]),
            shadow_fraction=float(s["shadow_fraction"]),
            keep_warm_s=float(s["keep_warm_s"]),
            salt=str(s["salt"]),
        )
        phase = Phase(record["phase"])
        step = int(record["step"])
        if phase.active and spec.steps and not 0 <= step < len(spec.steps):
            raise ValueError(f"step {step} is outside the {len(spec.steps)} steps")
        override = record.get("weight_override")
        return cls(
            model=str(record["model"]),
            stable=str(record["stable"]),
            candidate=str(record["candidate"]),
            spec=spec,
            started_at=now,
            phase=phase,
            step=step,
            reason=str(record["reason"]),
            analysis=str(record.get("analysis", "")),
            finished_at=None if phase.active else now,
            retired=bool(record["retired"]),
            candidate_was_loaded=bool(record["candidate_was_loaded"]),
            weight_override=None if override is None else float(override),
            replay=record.get("replay"),
        )
