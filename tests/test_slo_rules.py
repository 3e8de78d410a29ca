"""`convoy slo rules`: generated rules pass `promtool check rules`, and `promtool test rules`
shows each burn-rate alert firing on a synthetic burn at its rate and silent below it."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from convoy.cli import build_parser, main
from convoy.monitoring.objectives import load_config_file, parse_objectives
from convoy.monitoring.slo_rules import (
    BURN_ALERTS,
    generate_rules,
    promql_string,
    ratio_record,
    render_rules,
)
from tests.test_dashboard import unknown_metrics

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool missing: apt-get install -y prometheus (CI's .ci/run installs it)",
)
DECLARED = """
models:
  tiny:
    objectives:
      - {name: availability, kind: availability, target: 99.9, window: 28d}
      - {name: fast, kind: latency, target: 99, threshold_ms: 50, window: 28d}
  cnn:
    objectives:
      - {name: drift_free, kind: quality, target: 95, window: 7d}
"""
PER_STEP = 100_000  # events per 2-minute step in the synthetic series
# Long enough for both windows of each alert to be full of the burn.
EVAL_AT = {"ConvoySloFastBurn": "70m", "ConvoySloMediumBurn": "7h", "ConvoySloSlowBurn": "73h"}


def _rules_file(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    config = tmp_path / "slos.yaml"
    config.write_text(DECLARED)
    out = tmp_path / "rules.yml"
    assert main(["slo", "rules", "--slo-config", str(config), "--out", str(out)]) == 0
    return out, yaml.safe_load(out.read_text())


def _rules(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in content["groups"] for rule in group["rules"]]


def test_rules_cover_every_window_and_alert(tmp_path: Path) -> None:
    _, content = _rules_file(tmp_path)
    rules = _rules(content)
    records = {
        (r["record"], r["labels"]["model"], r["labels"]["slo"]) for r in rules if "record" in r
    }
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        for model, slo in (("tiny", "availability"), ("tiny", "fast"), ("cnn", "drift_free")):
            assert (f"convoy_slo:error_ratio:rate{window}", model, slo) in records
    alerts = [r for r in rules if "alert" in r]
    assert len(alerts) == 3 * 3
    for alert in alerts:
        assert set(alert["labels"]) == {"model", "slo", "severity"}
        assert alert["annotations"]["runbook_url"]
    severities = {a["alert"]: a["labels"]["severity"] for a in alerts}
    assert severities == {"ConvoySloFastBurn": "page", "ConvoySloMediumBurn": "page",
                          "ConvoySloSlowBurn": "ticket"}  # fmt: skip
    recorded = {str(r["record"]) for r in rules if "record" in r}
    assert unknown_metrics(str(r["expr"]) for r in rules) - recorded == set()


def test_latency_rules_read_the_events_of_their_objective(tmp_path: Path) -> None:
    _, content = _rules_file(tmp_path)
    fast = next(g for g in content["groups"] if g["name"] == "convoy-slo-tiny-fast")
    expr = fast["rules"][0]["expr"]
    assert 'convoy_slo_events_total{model="tiny",slo="fast",good="false"}[5m]' in expr
    quality = next(g for g in content["groups"] if g["name"] == "convoy-slo-cnn-drift_free")
    assert "convoy_drift_alarms_total" in quality["rules"][0]["expr"]


def test_scaled_windows_leave_the_production_output_alone(tmp_path: Path) -> None:
    declared = load_config_file(_write(tmp_path))
    production = render_rules(generate_rules(declared))
    assert "[5m]" in production and "[28d]" in production
    scaled = render_rules(generate_rules(declared, scale=1 / 60))
    assert "[5s]" in scaled and "[60s]" in scaled and "[5m]" not in scaled
    assert render_rules(generate_rules(declared)) == production


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "slos.yaml"
    path.write_text(DECLARED)
    return path


def test_bad_declaration_is_reported_with_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "slos.yaml"
    config.write_text("models:\n  tiny: {objectives: [{name: a, kind: latency, target: 99}]}\n")
    err = io.StringIO()
    from convoy.monitoring.slo_cli import run_slo

    args = build_parser().parse_args(["slo", "rules", "--slo-config", str(config)])
    assert run_slo(args, io.StringIO(), err) == 2
    assert f"{config}: models.tiny.objectives[0].threshold_ms: missing" in err.getvalue()
    args = build_parser().parse_args(["slo", "rules"])
    assert run_slo(args, io.StringIO(), err) == 2
    assert "give --model-repository DIR or --slo-config FILE" in err.getvalue()


@needs_promtool
def test_generated_rules_pass_promtool_check(tmp_path: Path) -> None:
    out, _ = _rules_file(tmp_path)
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 42 rules found" in result.stdout


def _burn_case(
    alert: dict[str, Any],
    factor: float,
    bad_share: float,
    model: str = "tiny",
    minutes: int = 73 * 60,
) -> dict[str, Any]:
    """A constant error ratio of `bad_share` times the alert's threshold, for 3 days (or
    `minutes`), on `model`'s availability objective (99.9%)."""
    ratio = factor * 0.001 * bad_share
    bad = round(PER_STEP * ratio)
    labels = f'model={promql_string(model)},slo="availability"'
    steps = (minutes + 6) // 2  # one sample per 2 minutes: 2 or 3 in the 5m window
    fires = bad_share > 1
    return {
        "interval": "2m",
        "input_series": [
            {"series": f'convoy_slo_events_total{{{labels},good="true"}}',
             "values": f"0+{PER_STEP - bad}x{steps}"},
            {"series": f'convoy_slo_events_total{{{labels},good="false"}}',
             "values": f"0+{bad}x{steps}"},
        ],
        "alert_rule_test": [
            {
                "eval_time": EVAL_AT[alert["alert"]],
                "alertname": alert["alert"],
                "exp_alerts": [{"exp_labels": alert["labels"],
                                "exp_annotations": alert["annotations"]}] if fires else [],
            }
        ],
    }  # fmt: skip


# How long a stopped burn has been over when the alert is checked again: past its short
# window, well inside its long one.
STOPPED_FOR = {"ConvoySloFastBurn": 10, "ConvoySloMediumBurn": 46, "ConvoySloSlowBurn": 540}


def _minutes(duration: str) -> int:
    return int(duration[:-1]) * {"m": 1, "h": 60, "d": 1440}[duration[-1]]


def _stopped_case(alert: dict[str, Any], factor: float, long: str, short: str) -> dict[str, Any]:
    """Three times the alert's rate until it fires, then no failure at all: once the short
    window has none, the alert is silent though the long window is still over it."""
    ratio = 3 * factor * 0.001
    bad = round(PER_STEP * ratio)
    labels = 'model="tiny",slo="availability"'
    burning = _minutes(EVAL_AT[alert["alert"]]) // 2  # steps of 2 minutes
    stopped = STOPPED_FOR[alert["alert"]] // 2
    good = PER_STEP - bad
    limit = factor * 0.001
    checked = f"{(burning + stopped) * 2}m"
    return {
        "interval": "2m",
        "input_series": [
            {"series": f'convoy_slo_events_total{{{labels},good="true"}}',
             "values": f"0+{good}x{burning} {burning * good + PER_STEP}+{PER_STEP}x{stopped}"},
            {"series": f'convoy_slo_events_total{{{labels},good="false"}}',
             "values": f"0+{bad}x{burning} {burning * bad}+0x{stopped}"},
        ],
        "alert_rule_test": [
            {"eval_time": EVAL_AT[alert["alert"]], "alertname": alert["alert"],
             "exp_alerts": [{"exp_labels": alert["labels"],
                             "exp_annotations": alert["annotations"]}]},
            {"eval_time": checked, "alertname": alert["alert"], "exp_alerts": []},
        ],
        "promql_expr_test": [  # the long window alone would still fire; the short has none
            {"expr": f"{ratio_record(long)}{{{labels}}} > bool {limit:g}", "eval_time": checked,
             "exp_samples": [{"labels": "{" + labels + "}", "value": 1}]},
            {"expr": f"{ratio_record(short)}{{{labels}}}", "eval_time": checked,
             "exp_samples": [{"labels": f"{ratio_record(short)}{{{labels}}}", "value": 0}]},
        ],
    }  # fmt: skip


@needs_promtool
def test_each_alert_fires_at_its_burn_rate_and_not_below(tmp_path: Path) -> None:
    # One objective's rules (the others' would only slow the 3-day evaluation down).
    declared = load_config_file(_write(tmp_path))
    tiny = declared["tiny"]
    one = {"tiny": dataclasses.replace(tiny, objectives=tiny.objectives[:1])}
    content = generate_rules(one)
    out = tmp_path / "one.yml"
    out.write_text(render_rules(content))
    group = content["groups"][0]
    alerts = {r["alert"]: r for r in group["rules"] if "alert" in r}
    tests = []
    for burn in BURN_ALERTS:
        for share in (1.05, 0.95):  # just over the alert's factor, and just under it
            tests.append(_burn_case(alerts[burn.alert], burn.factor, share))
    for burn in BURN_ALERTS:  # a burn that stopped: the short window keeps it silent
        tests.append(_stopped_case(alerts[burn.alert], burn.factor, burn.long, burn.short))
    # A burn that pages at 6x stays under the fast alert's 14.4x.
    tests.append(_burn_case(alerts["ConvoySloFastBurn"], 6.0, 1.05))
    tests[-1]["alert_rule_test"][0]["exp_alerts"] = []
    spec = tmp_path / "slo_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [out.name], "evaluation_interval": "2m", "tests": tests})
    )
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", spec.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_model_names_are_escaped_as_promql_strings() -> None:
    assert promql_string("tiny") == '"tiny"'
    assert promql_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    odd = 'we"ird\\name'
    objectives = parse_objectives(
        {"objectives": [{"name": "availability", "kind": "availability", "target": 99.9},
                        {"name": "drift_free", "kind": "quality", "target": 95}]},
        "slo.yaml", odd,
    )  # fmt: skip
    rules = _rules(generate_rules({odd: objectives}))
    exprs = "\n".join(str(r["expr"]) for r in rules)
    assert 'model="we\\"ird\\\\name",slo="availability"' in exprs
    assert 'convoy_drift_alarms_total{model="we\\"ird\\\\name"}' in exprs
    assert 'model="we"ird' not in exprs


@needs_promtool
def test_an_odd_model_name_passes_promtool_and_its_alert_fires(tmp_path: Path) -> None:
    """A quote and a backslash in a model's name: the rules parse, and its fast-burn
    alert fires on that model's series (the name read back exactly)."""
    odd = 'we"ird\\name'
    objectives = parse_objectives(
        {"objectives": [{"name": "availability", "kind": "availability", "target": 99.9}]},
        "slo.yaml", odd,
    )  # fmt: skip
    content = generate_rules({odd: objectives})
    out = tmp_path / "odd.yml"
    out.write_text(render_rules(content))
    assert PROMTOOL is not None
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(out)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    alert = next(r for r in _rules(content) if r.get("alert") == "ConvoySloFastBurn")
    case = _burn_case(alert, 14.4, 1.05, model=odd, minutes=70)
    assert case["alert_rule_test"][0]["exp_alerts"][0]["exp_labels"]["model"] == odd
    spec = tmp_path / "odd_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [out.name], "evaluation_interval": "2m", "tests": [case]})
    )
    result = subprocess.run(
        [PROMTOOL, "test", "rules", spec.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
