"""deploy/prometheus: the alert rules parse, and the important ones fire (promtool), on
metrics the server exports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_dashboard import metric_names, unknown_metrics

RULES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool missing: apt-get install -y prometheus (CI's .ci/run installs it)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_rules_fire_as_their_unit_tests_expect() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_required_alerts_exist_and_are_unit_tested() -> None:
    names = {str(rule["alert"]) for rule in _rules()}
    required = {
        "ConvoyDriftDetected", "ConvoyAccuracyDrop", "ConvoyHighErrorRate",
        "ConvoyLatencyOverSlo", "ConvoyQueueSaturated", "ConvoyGpuFallbackActive",
        "ConvoyRolloutRolledBack",
    }  # fmt: skip
    assert required <= names
    tests = yaml.safe_load((RULES_DIR / "alerts_test.yml").read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {"ConvoyDriftDetected", "ConvoyAccuracyDrop", "ConvoyRolloutRolledBack"} <= firing


def test_rules_read_only_exported_metrics() -> None:
    exprs = [str(rule["expr"]) for rule in _rules()]
    assert unknown_metrics(exprs) == set()
    assert "convoy_drift_detected" in metric_names(exprs)
