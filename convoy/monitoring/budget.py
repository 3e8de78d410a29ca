"""The error budget left, read from Prometheus (the rules `convoy slo rules` generates
record it over each objective's whole period, 28 days by default). `convoy rollout
start --prometheus-url` refuses a rollout while it is spent. DESIGN §14."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .slo_rules import REMAINING_RECORD, model_matcher


class BudgetUnknown(Exception):
    """Prometheus could not be asked, or answered with an error."""


@dataclass(frozen=True)
class BudgetLeft:
    slo: str
    window: str
    remaining: float  # share of the budget left: 1 untouched, 0 spent, below 0 overspent

    @property
    def spent(self) -> bool:
        return math.isfinite(self.remaining) and self.remaining <= 0.0


def read_budgets(prometheus_url: str, model: str, timeout_s: float = 10.0) -> list[BudgetLeft]:
    """Every objective's budget left for `model`, by Prometheus's HTTP API (an instant
    query of the recorded ratio). Empty: nothing recorded (rules not loaded, or a model
    without objectives)."""
    query = f"{REMAINING_RECORD}{{{model_matcher(model)}}}"
    url = prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            body = json.loads(reply.read())
    except (OSError, ValueError) as exc:
        raise BudgetUnknown(f"cannot query Prometheus at {prometheus_url}: {exc}") from None
    if body.get("status") != "success":
        raise BudgetUnknown(f"Prometheus at {prometheus_url} answered: {body.get('error', body)}")
    budgets = []
    for sample in body.get("data", {}).get("result", []):
        labels = sample.get("metric", {})
        budgets.append(
            BudgetLeft(
                str(labels.get("slo", "")), str(labels.get("window", "")), float(sample["value"][1])
            )
        )
    return sorted(budgets, key=lambda b: b.slo)


def refusal(model: str, budgets: list[BudgetLeft]) -> str | None:
    """Why a rollout of `model` must wait, or None while every budget has some left."""
    spent = [b for b in budgets if b.spent]
    if not spent:
        return None
    figures = "; ".join(
        f"SLO '{b.slo}': {b.remaining:.0%} of its {b.window} budget left" for b in spent
    )
    return (
        f"model '{model}' has spent its error budget ({figures}): a rollout now would risk "
        "what is left of the objective; restore reliability first, or pass --ignore-budget"
    )
