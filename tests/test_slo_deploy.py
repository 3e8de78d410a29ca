"""What operators install for SLOs: the example models' generated rules (deploy/prometheus,
and the Helm chart's copy) are up to date with their declaration and pass promtool; the
chart ships them as a PrometheusRule where the API exists and passes the objectives to
the server; the SLO dashboard reads only series the server exports or the rules record."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from convoy.monitoring.objectives import load_config_file
from convoy.monitoring.slo_rules import generate_rules, render_rules
from tests.test_dashboard import _queries, metric_names, unknown_metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CHART_FILES = ROOT / "deploy" / "helm" / "convoy" / "files"
DASHBOARD = ROOT / "deploy" / "grafana" / "convoy-slo.json"
PROMTOOL = shutil.which("promtool")


def _generated() -> str:
    return render_rules(generate_rules(load_config_file(PROMETHEUS_DIR / "slo.yaml")))


def test_committed_rules_are_generated_from_the_declaration() -> None:
    expected = _generated()
    assert (PROMETHEUS_DIR / "slo-rules.yml").read_text() == expected, (
        "regenerate: convoy slo rules --slo-config deploy/prometheus/slo.yaml "
        "--out deploy/prometheus/slo-rules.yml (and copy both to deploy/helm/convoy/files/)"
    )
    for name in ("slo.yaml", "slo-rules.yml"):
        assert (CHART_FILES / name).read_text() == (PROMETHEUS_DIR / name).read_text(), name


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: apt-get install -y prometheus")
def test_committed_rules_pass_promtool() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", "slo-rules.yml"],
        cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _recorded() -> set[str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "slo-rules.yml").read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def test_dashboard_reads_exported_or_recorded_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert unknown_metrics(queries) - _recorded() == set()
    names = metric_names(queries)
    for needed in (
        "convoy_slo:error_budget_remaining:ratio",  # budget left
        "convoy_slo:error_ratio:rate1h",  # burn rates, fast pair
        "convoy_slo:error_ratio:rate5m",
        "convoy_slo_burn_rate",  # the server's own
        "convoy_slo_events_total",
        "convoy_slo_shed_total",
    ):
        assert needed in names, needed
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}


# -- the Helm chart ----------------------------------------------------------------------

needs_helm = pytest.mark.skipif(
    importlib.util.find_spec("helm_python") is None
    or importlib.util.find_spec("kubernetes_validate") is None,
    reason="helm-python-sdk / kubernetes-validate missing (test extras)",
)


def _rule(objects: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert len(found) <= 1
    return found[0] if found else None


@needs_helm
def test_chart_ships_the_generated_rules_and_the_objectives() -> None:
    from tests import test_helm_chart as helm_chart

    objects = helm_chart.render({})  # the built-in examples
    rule = _rule(objects)
    assert rule is not None and rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == f"{helm_chart.FULLNAME}-slo"
    assert rule["spec"] == {"groups": yaml.safe_load(_generated())["groups"]}
    args = helm_chart.serve_args(objects)
    assert str(args.slo_config) == "/etc/convoy/slo/slo.yaml"
    config = helm_chart.one(objects, "ConfigMap", f"{helm_chart.FULLNAME}-slo")
    assert yaml.safe_load(config["data"]["slo.yaml"]) == yaml.safe_load(
        (PROMETHEUS_DIR / "slo.yaml").read_text()
    )
    container = helm_chart.server_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "slo")
    assert mount["mountPath"] == "/etc/convoy/slo" and mount["readOnly"] is True


@needs_helm
def test_chart_rules_only_where_the_operator_api_exists_and_when_enabled() -> None:
    from tests import test_helm_chart as helm_chart

    assert _rule(helm_chart.render({}, api_versions=())) is None
    objects = helm_chart.render({"slo": {"enabled": False}})
    assert _rule(objects) is None and helm_chart.serve_args(objects).slo_config is None


@needs_helm
def test_chart_takes_the_objectives_and_rules_of_your_own_repository(tmp_path: Path) -> None:
    from tests import test_helm_chart as helm_chart

    declared = "models:\n  m: {objectives: [{name: up, kind: availability, target: 99.5}]}\n"
    config = tmp_path / "slos.yaml"
    config.write_text(declared)
    rules = render_rules(generate_rules(load_config_file(config)))
    pvc = {"source": "pvc", "pvc": {"claimName": "models"}}
    objects = helm_chart.render({"modelRepository": pvc})
    assert _rule(objects) is None and helm_chart.serve_args(objects).slo_config is None
    objects = helm_chart.render(
        {"modelRepository": pvc, "slo": {"config": declared, "rules": rules,
                                         "labels": {"release": "kube-prometheus"}}}
    )  # fmt: skip
    rule = _rule(objects)
    assert rule is not None and rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert [g["name"] for g in rule["spec"]["groups"]] == ["convoy-slo-m-up"]
    assert helm_chart.serve_args(objects).slo_config is not None
    with pytest.raises(Exception, match=re.escape("slo.rules must be the output of `convoy")):
        helm_chart.render({"modelRepository": pvc, "slo": {"rules": "- just a list\n"}})
