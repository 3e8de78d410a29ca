"""What a rollout is asked to do: strategy, steps, gates. Plain, validated data.

One constructor (`make_spec`) serves the CLI, the admin service and the declared
policy file, so all three reject the same input with the same message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import InvalidInput


class Strategy(StrEnum):
    CANARY = "canary"
    BLUE_GREEN = "blue-green"
    SHADOW = "shadow"
    AB = "ab"


class Phase(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"

    @property
    def active(self) -> bool:
        return self in (Phase.PROGRESSING, Phase.PAUSED)


@dataclass(frozen=True)
class Gates:
    """Thresholds the candidate must stay under. None: that gate is off."""

    max_error_rate: float | None = 0.01  # server-side errors / requests
    max_p99_ms: float | None = None  # compute p99 (queue excluded: small batches wait longer)
    max_queue_p99_ms: float | None = None
    max_divergence: float | None = None  # largest max-abs-diff of any compared output
    min_requests: int = 100  # per version per window; fewer: inconclusive, hold
    # The candidate's SLO burn rate in the step window (the model's declared objectives).
    max_burn_rate: float | None = None


DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)
REPLAY_MAX_REQUESTS = 1000  # as `convoy replay --max-requests`


@dataclass(frozen=True)
class ReplayGate:
    """Replay captured traffic on the candidate before it gets any (docs/rollouts.md).

    Times are kept as given: an ISO 8601 time, or a duration before the start such
    as 6h, so that a declared rollout's window is read when its version appears."""

    since: str
    until: str | None = None
    max_diff_rate: float = 0.01  # as `convoy replay --max-diff-rate`
    max_requests: int = REPLAY_MAX_REQUESTS


@dataclass(frozen=True)
class RolloutSpec:
    strategy: Strategy
    steps: tuple[float, ...]  # candidate percent per step; ab: one value, the candidate's share
    step_interval_s: float = 30.0  # canary step / blue-green bake / shadow and ab report interval
    gates: Gates = field(default_factory=Gates)
    # Share of requests also run on the other version for output comparison
    # (shadow: on the candidate; canary, blue-green: on the other one, when
    # max_divergence is set).
    shadow_fraction: float = 0.0
    keep_warm_s: float = 300.0  # the replaced version stays loaded this long
    salt: str = ""  # ab: experiment salt; empty: "<model>:<candidate>"
    replay: ReplayGate | None = None  # the candidate is replayed first; None: no replay gate


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int, name: str) -> float:
    """'30s', '5m', '1h', '500ms' or a bare number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise InvalidInput(f"{name}: '{text}' is not a duration such as 30s, 5m, 1h")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"{name}: {text} is not a duration of zero or more")
    return seconds


def _fraction(value: float | None, name: str) -> None:
    if value is not None and not (0.0 <= value <= 1.0):
        raise InvalidInput(f"{name}: {value} is not between 0 and 1")


def _positive(value: float | None, name: str) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InvalidInput(f"{name}: {value} must be a number of zero or more")


def make_spec(
    strategy: str,
    *,
    steps: tuple[float, ...] | None = None,
    step_interval_s: float = 30.0,
    gates: Gates | None = None,
    shadow_fraction: float | None = None,
    keep_warm_s: float = 300.0,
    salt: str = "",
    replay: ReplayGate | None = None,
) -> RolloutSpec:
    """Validate and fill defaults; InvalidInput names the field at fault."""
    try:
        kind = Strategy(strategy)
    except ValueError:
        choices = ", ".join(s.value for s in Strategy)
        raise InvalidInput(f"strategy: '{strategy}' is not one of {choices}") from None
    gates = gates or Gates()
    _fraction(gates.max_error_rate, "max_error_rate")
    _positive(gates.max_p99_ms, "max_p99_ms")
    _positive(gates.max_queue_p99_ms, "max_queue_p99_ms")
    _positive(gates.max_divergence, "max_divergence")
    _positive(gates.max_burn_rate, "max_burn_rate")
    if gates.min_requests < 1:
        raise InvalidInput(f"min_requests: {gates.min_requests} must be at least 1")
    if step_interval_s <= 0:
        raise InvalidInput(f"step_interval: {step_interval_s} s must be positive")
    _positive(keep_warm_s, "keep_warm")
    _fraction(shadow_fraction, "shadow_fraction")
    if kind is Strategy.BLUE_GREEN:
        if steps not in (None, (), (100.0,)):
            raise InvalidInput("steps: blue-green switches 100% at once; give no steps")
        steps = (100.0,)
    elif kind is Strategy.SHADOW:
        if steps:
            raise InvalidInput("steps: shadow sends the candidate no caller traffic; give no steps")
        steps = ()
    elif kind is Strategy.AB:
        steps = steps or (50.0,)
        if len(steps) != 1:
            raise InvalidInput("steps: ab takes one value, the candidate's percent")
    else:
        steps = steps or DEFAULT_STEPS
    for step in steps:
        if not (math.isfinite(step) and 0.0 <= step <= 100.0):
            raise InvalidInput(f"steps: weight {step:g} is out of range 0..100")
    if kind is Strategy.CANARY:
        if list(steps) != sorted(set(steps)) or steps[-1] != 100.0 or steps[0] <= 0:
            raise InvalidInput(
                f"steps: {','.join(f'{s:g}' for s in steps)} must rise strictly, start above 0 "
                "and end at 100"
            )
    if shadow_fraction is None:
        # Shadow needs traffic to compare; canary and blue-green compare only when a
        # divergence gate asks.
        if kind is Strategy.SHADOW:
            shadow_fraction = 0.1
        elif kind in (Strategy.CANARY, Strategy.BLUE_GREEN) and gates.max_divergence is not None:
            shadow_fraction = 0.05
        else:
            shadow_fraction = 0.0
    if kind is Strategy.SHADOW and shadow_fraction == 0.0:
        raise InvalidInput("shadow_fraction: a shadow rollout needs a fraction above 0")
    if replay is not None:
        _check_replay(replay)
    return RolloutSpec(
        strategy=kind,
        steps=tuple(float(s) for s in steps),
        step_interval_s=float(step_interval_s),
        gates=gates,
        shadow_fraction=float(shadow_fraction),
        keep_warm_s=float(keep_warm_s),
        salt=salt,
        replay=replay,
    )


def replay_window(gate: ReplayGate, now: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """The gate's [since, until) as UTC times, durations counted back from `now`;
    InvalidInput naming the field."""
    from ..capture.replay_cli import parse_time

    def parse(text: str, name: str) -> dt.datetime:
        try:
            return parse_time(text, now)
        except argparse.ArgumentTypeError as exc:
            raise InvalidInput(f"{name}: {exc}") from None

    since = parse(gate.since, "replay_since")
    until = None if gate.until is None else parse(gate.until, "replay_until")
    if until is not None and since >= until:
        raise InvalidInput(f"replay_since: {gate.since} must be before replay_until {gate.until}")
    return since, until


def _check_replay(gate: ReplayGate) -> None:
    if not gate.since.strip():
        raise InvalidInput("replay_since: empty; give a time or a duration ago such as 6h")
    replay_window(gate, dt.datetime.now(dt.UTC))
    if not (math.isfinite(gate.max_diff_rate) and 0.0 <= gate.max_diff_rate <= 1.0):
        raise InvalidInput(f"replay_max_diff_rate: {gate.max_diff_rate} is not between 0 and 1")
    if gate.max_requests < 1:
        raise InvalidInput(f"replay_max_requests: {gate.max_requests} must be at least 1")
