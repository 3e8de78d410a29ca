"""deploy/grafana/convoy.json: every query names metrics the server exports."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

from convoy.heap import GcPauses
from convoy.metrics import Metrics
from convoy.monitoring.exporter import MonitoringCollector
from convoy.monitoring.registry import Monitors
from convoy.workers.exporter import FrontendCollector

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "convoy.json"

# convoy/rollouts/exporter.py builds these at scrape time from its controller (its
# describe() lists none), so they are named here and checked against its source.
ROLLOUT_METRICS = {"convoy_rollout_weight": "gauge", "convoy_rollout_phase": "gauge",
                   "convoy_rollout_events": "counter"}  # fmt: skip
# Expected from the scheduler, not exported yet: batches an InstancePool retried on a CPU
# instance after a GPU fault (InstancePool.fallbacks), as a counter {model,version}.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_NAME = re.compile(r"\bconvoy_[A-Za-z0-9_:]*")


def exported_names() -> set[str]:
    """Every series name the server can expose: its registry, the monitoring exporter
    and the rollout exporter."""
    metrics = Metrics()
    metrics.watch_serving(list, dict)  # the instance-pool counters and failed devices
    GcPauses(metrics.registry)  # registered by the server beside its metrics (never started)
    families: list[tuple[str, str]] = [(m.name, m.type) for m in metrics.registry.collect()]
    families += [(m.name, m.type) for m in MonitoringCollector(Monitors()).describe()]
    # The front ends' series, from a link and supervisor with nothing running.
    idle_link = SimpleNamespace(segments=0, tensor_bytes={}, requests={}, gc_pauses={})
    no_frontends = SimpleNamespace(pids=[], restarts=0, pids_by_index={})
    frontends = FrontendCollector(idle_link, no_frontends)  # type: ignore[arg-type]
    families += [(m.name, m.type) for m in frontends.collect()]
    families += list(ROLLOUT_METRICS.items())
    return {name + suffix for name, kind in families for suffix in _SUFFIXES[kind]}


def metric_names(exprs: Iterable[str]) -> set[str]:
    return {name for expr in exprs for name in _NAME.findall(expr)}


def unknown_metrics(exprs: Iterable[str]) -> set[str]:
    return metric_names(exprs) - exported_names()


def _queries(node: object) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variables."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and "(" in value:
                found.append(value)
            else:
                found.extend(_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_queries(item))
    return found


def test_every_query_names_exported_metrics() -> None:
    queries = _queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) > 20
    assert unknown_metrics(queries) == set()


def test_the_checker_catches_a_misspelt_metric() -> None:
    assert unknown_metrics(["rate(convoy_request_sucess_total[5m])"]) == {
        "convoy_request_sucess_total"
    }
    assert unknown_metrics(["rate(convoy_request_success_total[5m])"]) == set()


def test_dashboard_covers_what_operators_look_at() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = metric_names(_queries(dashboard))
    for needed in (
        "convoy_request_success_total",  # throughput
        "convoy_request_seconds_bucket",  # latency percentiles
        "convoy_batch_size_bucket",  # batch sizes
        "convoy_queue_depth",
        "convoy_gpu_utilization",
        "convoy_drift_detected",
        "convoy_drift_p_value",
        "convoy_feedback_accuracy",
        "convoy_gc_pause_seconds_bucket",  # the event loop stopped by the collector
        "convoy_frontend_requests_total",  # how connections spread over the front ends
    ):
        assert needed in names, needed
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert set(panel["gridPos"]) == {"x", "y", "w", "h"}


def test_rollout_metrics_named_here_are_the_exporters() -> None:
    try:
        from convoy.rollouts import exporter
    except ImportError:  # rollouts not merged yet: the names above stand as expected
        return
    source = inspect.getsource(exporter)
    for name in ROLLOUT_METRICS:
        assert f'"{name}"' in source, name
