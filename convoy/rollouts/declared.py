"""A rollout declared in the repository: `rollout.json` beside config.pbtxt.

When a model directory holds this file and a new version appears (a
RepositoryModelLoad or a repository poll), the declared rollout starts by
itself. A model without it keeps Triton's behaviour exactly. JSON (chosen when
the server read no YAML; slo.yaml came later). Example:

    {
      "strategy": "canary",
      "steps": [5, 25, 50, 100],
      "step_interval": "30s",
      "max_error_rate": 0.01,
      "max_p99_ms": 50,
      "max_divergence": 0.001,
      "min_requests": 200,
      "replay_since": "6h",
      "replay_max_diff_rate": 0.01
    }

replay_since (and replay_until, replay_max_diff_rate, replay_max_requests) add the
replay gate: captured traffic is replayed on the new version before it gets any. A
duration there counts back from the moment the new version appears.

Keys are the CLI's flag names with underscores; unknown keys are errors, so a
typo fails the load instead of silently dropping a gate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidInput
from .spec import (
    REPLAY_MAX_REQUESTS,
    Gates,
    ReplayGate,
    RolloutSpec,
    make_spec,
    parse_duration,
)

POLICY_FILENAME = "rollout.json"

_NUMBERS = ("max_error_rate", "max_p99_ms", "max_queue_p99_ms", "max_divergence", "max_burn_rate")
_KEYS = frozenset(
    {
        "strategy",
        "steps",
        "step_interval",
        "min_requests",
        "shadow_fraction",
        "keep_warm",
        "salt",
        "replay_since",
        "replay_until",
        "replay_max_diff_rate",
        "replay_max_requests",
        *_NUMBERS,
    }
)


def read_policy(model_dir: Path) -> RolloutSpec | None:
    """The model's declared rollout, or None when it declares none."""
    path = model_dir / POLICY_FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), "<file>", f"not valid JSON: {exc}") from exc
    return parse_policy(data, str(path))


def parse_policy(data: Any, path: str) -> RolloutSpec:
    if not isinstance(data, dict):
        raise ConfigError(path, "<file>", "expected a JSON object")
    for key in data:
        if key not in _KEYS:
            raise ConfigError(path, key, f"unknown field; known: {', '.join(sorted(_KEYS))}")
    if "strategy" not in data:
        raise ConfigError(path, "strategy", "missing (canary, blue-green, shadow or ab)")
    numbers: dict[str, float | None] = {}
    for key in _NUMBERS:
        value = data.get(key)
        numbers[key] = None if value is None else _number(value, path, key)
    gates = Gates(
        max_error_rate=numbers["max_error_rate"] if "max_error_rate" in data else 0.01,
        max_p99_ms=numbers["max_p99_ms"],
        max_queue_p99_ms=numbers["max_queue_p99_ms"],
        max_divergence=numbers["max_divergence"],
        max_burn_rate=numbers["max_burn_rate"],
        min_requests=_integer(data.get("min_requests", 100), path, "min_requests"),
    )
    steps = data.get("steps")
    if steps is not None and not isinstance(steps, list):
        raise ConfigError(path, "steps", "expected a list of percents such as [5, 25, 50, 100]")
    strategy = data["strategy"]
    salt = data.get("salt", "")
    if not isinstance(strategy, str):
        raise ConfigError(path, "strategy", "expected a string")
    if not isinstance(salt, str):
        raise ConfigError(path, "salt", "expected a string")
    fraction = data.get("shadow_fraction")
    shadow_fraction = None if fraction is None else _number(fraction, path, "shadow_fraction")
    try:
        return make_spec(
            strategy,
            steps=None if steps is None else tuple(_number(s, path, "steps") for s in steps),
            step_interval_s=parse_duration(data.get("step_interval", 30.0), "step_interval"),
            gates=gates,
            shadow_fraction=shadow_fraction,
            keep_warm_s=parse_duration(data.get("keep_warm", 300.0), "keep_warm"),
            salt=salt,
            replay=_replay_gate(data, path),
        )
    except InvalidInput as exc:
        field, _, problem = exc.message.partition(": ")
        raise ConfigError(path, field, problem or exc.message) from None


def _replay_gate(data: dict[str, Any], path: str) -> ReplayGate | None:
    if "replay_since" not in data:
        for key in ("replay_until", "replay_max_diff_rate", "replay_max_requests"):
            if key in data:
                raise ConfigError(path, key, "needs replay_since (the replay window's start)")
        return None
    since, until = data["replay_since"], data.get("replay_until")
    for key, value in (("replay_since", since), ("replay_until", until)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(path, key, 'expected a time (ISO 8601) or a duration ago: "6h"')
    rate = data.get("replay_max_diff_rate")
    return ReplayGate(
        since=since,
        until=until,
        max_diff_rate=0.01 if rate is None else _number(rate, path, "replay_max_diff_rate"),
        max_requests=_integer(
            data.get("replay_max_requests", REPLAY_MAX_REQUESTS), path, "replay_max_requests"
        ),
    )


def _number(value: Any, path: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(path, key, f"expected a number, got {json.dumps(value)}")
    return float(value)


def _integer(value: Any, path: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, key, f"expected a whole number, got {json.dumps(value)}")
    return value
