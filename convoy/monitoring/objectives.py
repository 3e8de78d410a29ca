"""Service-level objectives: what a model promises, declared in YAML, validated at load.

A model declares its objectives in `slo.yaml` beside its config.pbtxt; a server or a
rule generator may also be given one file for many models (`--slo-config FILE`):

    models:
      tiny:
        objectives:
          - {name: availability, kind: availability, target: 99.9, window: 28d}

A wrong field is a ConfigError naming the file and the field. DESIGN §14.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import (
    ConfigError,
    ConvoyError,
    DeadlineExceeded,
    InternalError,
    ModelNotReady,
    Unavailable,
)

SLO_FILENAME = "slo.yaml"
DEFAULT_WINDOW = "28d"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DURATION = re.compile(r"^(\d+)(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Kind(StrEnum):
    AVAILABILITY = "availability"
    LATENCY = "latency"
    QUALITY = "quality"


# What the server answered with that spends an availability budget: its own failures
# (INTERNAL, UNAVAILABLE, and DEADLINE_EXCEEDED: time spent in its queue or compute).
# Client mistakes (INVALID_ARGUMENT, NOT_FOUND, CANCELLED) and refusals of a client's
# excess (RESOURCE_EXHAUSTED) are neither good nor bad events. A draining server's
# UNAVAILABLE is never offered (the path counts no admission refusal): a planned
# shutdown, retried on another replica.
SERVER_FAILURES: tuple[type[ConvoyError], ...] = (
    InternalError,
    Unavailable,
    ModelNotReady,
    DeadlineExceeded,
)


def is_server_failure(error: BaseException | None) -> bool:
    return error is not None and isinstance(error, SERVER_FAILURES)


def counts_for_availability(error: BaseException | None) -> bool:
    """An answered request is an availability event: a result, or a server failure."""
    return error is None or isinstance(error, SERVER_FAILURES)


@dataclass(frozen=True)
class Objective:
    name: str  # [a-z][a-z0-9_]*: a Prometheus label value and a rule-name part
    kind: Kind
    target: float  # percent of good events, 0 < target < 100
    window: str  # the budget's period as declared, e.g. 28d
    window_s: int
    threshold_ms: float | None = None  # latency: server-side request time over it is bad

    @property
    def ratio(self) -> float:
        """The target as a ratio (99.9 -> 0.999)."""
        return self.target / 100.0

    @property
    def budget(self) -> float:
        """The share of events that may be bad (99.9 -> 0.001)."""
        return round(100.0 - self.target, 9) / 100.0  # 99.9 -> 0.001, not 0.000999...


@dataclass(frozen=True)
class ModelObjectives:
    model: str
    objectives: tuple[Objective, ...]
    source: str  # the file they were declared in

    def find(self, name: str) -> Objective | None:
        return next((o for o in self.objectives if o.name == name), None)


def parse_window(text: object, path: str, field: str) -> int:
    """'28d', '6h', '30m', '1w', '90s' -> seconds."""
    match = _DURATION.match(str(text).strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) <= 0:
        raise ConfigError(path, field, f"{text!r} is not a duration such as 28d, 7d or 6h")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _number(value: object, path: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(path, field, f"{value!r} is not a number")
    return float(value)


_FIELDS = {"name", "kind", "target", "window", "threshold_ms", "description"}


def parse_objective(data: object, path: str, field: str) -> Objective:
    if not isinstance(data, Mapping):
        raise ConfigError(path, field, "must be a mapping with name, kind and target")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise ConfigError(
            path, f"{field}.{unknown[0]}", f"unknown field; expected one of {sorted(_FIELDS)}"
        )
    for required in ("name", "kind", "target"):
        if required not in data:
            raise ConfigError(path, f"{field}.{required}", "missing")
    name = data["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            path, f"{field}.name", f"{name!r} must match [a-z][a-z0-9_]* (a metric label)"
        )
    try:
        kind = Kind(str(data["kind"]))
    except ValueError:
        choices = " | ".join(k.value for k in Kind)
        raise ConfigError(path, f"{field}.kind", f"{data['kind']!r} is not {choices}") from None
    target = _number(data["target"], path, f"{field}.target")
    if not 0.0 < target < 100.0:
        raise ConfigError(
            path, f"{field}.target", f"{target:g} must be a percent above 0 and below 100"
        )
    window = str(data.get("window", DEFAULT_WINDOW))
    window_s = parse_window(data.get("window", DEFAULT_WINDOW), path, f"{field}.window")
    threshold = data.get("threshold_ms")
    if kind is Kind.LATENCY:
        if threshold is None:
            raise ConfigError(
                path, f"{field}.threshold_ms", "missing: a latency objective needs it"
            )
        threshold = _number(threshold, path, f"{field}.threshold_ms")
        if threshold <= 0:
            raise ConfigError(path, f"{field}.threshold_ms", f"{threshold:g} must be above 0")
    elif threshold is not None:
        raise ConfigError(
            path, f"{field}.threshold_ms", f"only a latency objective takes it, not {kind}"
        )
    return Objective(name, kind, target, window, window_s, threshold)


def parse_objectives(data: object, path: str, model: str, field: str = "") -> ModelObjectives:
    """One model's `{objectives: [...]}` mapping."""
    prefix = f"{field}." if field else ""
    if not isinstance(data, Mapping):
        raise ConfigError(path, field or "(top level)", "must be a mapping with 'objectives'")
    unknown = sorted(str(k) for k in data if k != "objectives")
    if unknown:
        raise ConfigError(path, prefix + unknown[0], "unknown field; expected 'objectives'")
    items = data.get("objectives")
    if not isinstance(items, list) or not items:
        raise ConfigError(path, prefix + "objectives", "must be a non-empty list")
    objectives: list[Objective] = []
    for i, item in enumerate(items):
        objective = parse_objective(item, path, f"{prefix}objectives[{i}]")
        if any(o.name == objective.name for o in objectives):
            raise ConfigError(
                path, f"{prefix}objectives[{i}].name", f"'{objective.name}' is declared twice"
            )
        objectives.append(objective)
    return ModelObjectives(model, tuple(objectives), path)


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "(file)", f"is not valid YAML: {exc}") from None


def load_model_file(path: Path, model: str) -> ModelObjectives:
    """<repository>/<model>/slo.yaml."""
    return parse_objectives(_read_yaml(path), str(path), model)


def load_config_file(path: Path) -> dict[str, ModelObjectives]:
    """`--slo-config FILE`: `models: {<model>: {objectives: [...]}}`."""
    data = _read_yaml(path)
    where = str(path)
    if not isinstance(data, Mapping) or set(data) != {"models"}:
        raise ConfigError(where, "models", "the file must be one mapping 'models: {MODEL: ...}'")
    models = data["models"]
    if not isinstance(models, Mapping) or not models:
        raise ConfigError(where, "models", "must map model names to their objectives")
    return {
        str(name): parse_objectives(spec, where, str(name), f"models.{name}")
        for name, spec in models.items()
    }


def load_objectives(repository: Path | None, config: Path | None) -> dict[str, ModelObjectives]:
    """Every model's objectives: each <repository>/<model>/slo.yaml, and `config`.
    A model declared in both places is a ConfigError (which one is meant?)."""
    found: dict[str, ModelObjectives] = {}
    if repository is not None and repository.is_dir():
        for slo in sorted(repository.glob(f"*/{SLO_FILENAME}")):
            model = slo.parent.name
            found[model] = load_model_file(slo, model)
    if config is not None:
        for model, declared in load_config_file(config).items():
            if model in found:
                raise ConfigError(
                    str(config),
                    f"models.{model}",
                    f"also declared in {found[model].source}; declare it in one place",
                )
            found[model] = declared
    return found
