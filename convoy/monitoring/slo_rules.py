"""Prometheus rules generated from declared objectives (Sloth's and Pyrra's approach).

Per objective: recording rules for its error ratio over the SRE workbook's windows,
its target and budget, the error ratio over its whole period and the budget left;
then the multi-window, multi-burn-rate alerts (the workbook's table 5-8): 14.4x over
1h and 5m (page), 6x over 6h and 30m (page), 1x over 3d and 6h (ticket). Nothing is
hand-written: `convoy slo rules` writes this file. docs/slo.md.

The indicators read only what the server exports: convoy_slo_events_total{model,slo,
good} (availability and latency, counted per answered request, see burn.py) and the
drift monitor's window counters (quality: the share of drift-free windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .objectives import Kind, ModelObjectives, Objective

EVENTS = "convoy_slo_events_total"
RATIO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
_WINDOW_S = {"5m": 300, "30m": 1800, "1h": 3600, "2h": 7200, "6h": 21600, "1d": 86400,
             "3d": 259200}  # fmt: skip
DEFAULT_RUNBOOK = "docs/slo.md#when-a-burn-rate-alert-fires"


@dataclass(frozen=True)
class BurnAlert:
    alert: str
    factor: float  # burn rate: budget spent this many times faster than it lasts
    long: str
    short: str
    severity: str  # page | ticket
    meaning: str


BURN_ALERTS = (
    BurnAlert("ConvoySloFastBurn", 14.4, "1h", "5m", "page", "2% of the budget in an hour"),
    BurnAlert("ConvoySloMediumBurn", 6.0, "6h", "30m", "page", "5% of the budget in 6 hours"),
    BurnAlert("ConvoySloSlowBurn", 1.0, "3d", "6h", "ticket", "10% of the budget in 3 days"),
)


def ratio_record(window: str) -> str:
    return f"convoy_slo:error_ratio:rate{window}"


PERIOD_RECORD = "convoy_slo:error_ratio:period"
OBJECTIVE_RECORD = "convoy_slo:objective:ratio"
BUDGET_RECORD = "convoy_slo:error_budget:ratio"
REMAINING_RECORD = "convoy_slo:error_budget_remaining:ratio"


def _range(seconds: int, nominal: str | None, scale: float) -> str:
    """A PromQL range. `scale` shrinks every window for a test that cannot wait an
    hour; at 1 (what `convoy slo rules` writes) the windows are the nominal ones."""
    if scale == 1.0 and nominal is not None:
        return nominal
    scaled = max(1, round(seconds * scale))
    return f"{scaled}s"


_PROMQL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def promql_string(value: str) -> str:
    """`value` as a double-quoted PromQL string literal (Go's escapes): a model name is
    a directory name, and a quote or a backslash in it must not end or bend the
    matcher."""
    return '"' + "".join(_PROMQL_ESCAPES.get(c, c) for c in value) + '"'


def model_matcher(model: str) -> str:
    return f"model={promql_string(model)}"


def _selector(model: str, objective: Objective) -> str:
    return f"{model_matcher(model)},slo={promql_string(objective.name)}"


def error_ratio_expr(model: str, objective: Objective, window: str) -> str:
    """The share of bad events over `window` (a PromQL range)."""
    if objective.kind is Kind.QUALITY:
        # A drift test window that alarmed is a bad event (every input of every version).
        return (
            f"sum(rate(convoy_drift_alarms_total{{{model_matcher(model)}}}[{window}]))\n"
            f"/\nsum(rate(convoy_drift_windows_total{{{model_matcher(model)}}}[{window}]))"
        )
    sel = _selector(model, objective)
    return (
        f'sum(rate({EVENTS}{{{sel},good="false"}}[{window}]))\n'
        f"/\nsum(rate({EVENTS}{{{sel}}}[{window}]))"
    )


def objective_group(
    declared: ModelObjectives,
    objective: Objective,
    *,
    scale: float = 1.0,
    runbook: str = DEFAULT_RUNBOOK,
) -> dict[str, Any]:
    model = declared.model
    labels = {"model": model, "slo": objective.name}
    rules: list[dict[str, Any]] = []
    for window in RATIO_WINDOWS:
        rng = _range(_WINDOW_S[window], window, scale)
        rules.append(
            {
                "record": ratio_record(window),
                "expr": error_ratio_expr(model, objective, rng),
                "labels": dict(labels),
            }
        )
    period = _range(objective.window_s, objective.window, scale)
    sel = _selector(model, objective)
    budget = f"{objective.budget:.6g}"
    rules += [
        {
            "record": PERIOD_RECORD,
            "expr": error_ratio_expr(model, objective, period),
            "labels": {**labels, "window": objective.window},
        },
        {"record": OBJECTIVE_RECORD, "expr": f"vector({objective.ratio:g})", "labels": labels},
        {"record": BUDGET_RECORD, "expr": f"vector({budget})", "labels": labels},
        {
            "record": REMAINING_RECORD,
            "expr": f"1 - {PERIOD_RECORD}{{{sel}}} / {budget}",
            "labels": {**labels, "window": objective.window},
        },
    ]
    what = _describe(objective)
    for burn in BURN_ALERTS:
        limit = f"({burn.factor:g} * {objective.budget:.6g})"
        rules.append(
            {
                "alert": burn.alert,
                "expr": (
                    f"{ratio_record(burn.long)}{{{sel}}} > {limit}\n"
                    f"and\n{ratio_record(burn.short)}{{{sel}}} > {limit}"
                ),
                "labels": {**labels, "severity": burn.severity},
                "annotations": {
                    "summary": (
                        f"{model}: SLO '{objective.name}' burns its error budget "
                        f"{burn.factor:g}x too fast"
                    ),
                    "description": (
                        f"{what} of {model} has been failing over {burn.long} and "
                        f"{burn.short} faster than {burn.factor:g} times its budget "
                        f"({objective.target:g}% over {objective.window}): at this rate "
                        f"{burn.meaning} is spent. `convoy_slo_burn_rate` shows it per window."
                    ),
                    "runbook_url": runbook,
                },
            }
        )
    return {"name": f"convoy-slo-{model}-{objective.name}", "rules": rules}


def _describe(objective: Objective) -> str:
    if objective.kind is Kind.LATENCY:
        return f"Latency objective '{objective.name}' (under {objective.threshold_ms:g} ms)"
    if objective.kind is Kind.QUALITY:
        return f"Quality objective '{objective.name}' (drift-free windows)"
    return f"Availability objective '{objective.name}'"


def generate_rules(
    declared: dict[str, ModelObjectives],
    *,
    scale: float = 1.0,
    runbook: str = DEFAULT_RUNBOOK,
) -> dict[str, Any]:
    """A Prometheus rule file's content: one group per (model, objective), by name."""
    groups = [
        objective_group(declared[model], objective, scale=scale, runbook=runbook)
        for model in sorted(declared)
        for objective in declared[model].objectives
    ]
    return {"groups": groups}


HEADER = (
    "# Generated by `convoy slo rules` from the models' declared objectives\n"
    "# (slo.yaml, --slo-config); do not edit: change the declaration and generate again.\n"
    "# docs/slo.md explains each rule.\n"
)


def render_rules(rules: dict[str, Any]) -> str:
    """YAML with each multi-line expression as a literal block, under HEADER."""
    import yaml

    class Literal(str):
        pass

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:  # the same labels dict, written out
            return True

    def literal(dumper: yaml.SafeDumper, text: Literal) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")

    Dumper.add_representer(Literal, literal)

    def blocks(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: blocks(v) for k, v in node.items()}
        if isinstance(node, list):
            return [blocks(v) for v in node]
        if isinstance(node, str) and "\n" in node:
            return Literal(node + "\n")
        return node

    body = yaml.dump(blocks(rules), Dumper=Dumper, sort_keys=False, width=100)
    return HEADER + str(body)
