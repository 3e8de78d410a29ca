"""Where `convoy cost` reads its figures: a server's /metrics, or Prometheus's HTTP API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .report import Reading

BUSY = "convoy_model_busy_seconds_total"
SUCCESS = "convoy_request_success_total"
MEMORY = "convoy_model_memory_bytes"


def _reading(readings: dict[tuple[str, str], Reading], model: str, version: str) -> Reading:
    key = (model, version)
    found = readings.get(key)
    if found is None:
        found = readings[key] = Reading(model, version)
    return found


def from_server(metrics_url: str, timeout_s: float = 10.0) -> list[Reading]:
    """Totals since the server started (its counters are never reset while it runs:
    an evicted model's count stays)."""
    with urllib.request.urlopen(_metrics_url(metrics_url), timeout=timeout_s) as reply:
        text = reply.read().decode()
    return parse_exposition(text)


def parse_exposition(text: str) -> list[Reading]:
    readings: dict[tuple[str, str], Reading] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "model" not in labels or "version" not in labels:
                continue
            if sample.name == BUSY:
                r = _reading(readings, labels["model"], labels["version"])
                r.busy_s[labels["device"]] = r.busy_s.get(labels["device"], 0.0) + sample.value
            elif sample.name == SUCCESS:
                _reading(readings, labels["model"], labels["version"]).inferences += sample.value
            elif sample.name == MEMORY:
                r = _reading(readings, labels["model"], labels["version"])
                r.memory_bytes[labels["device"]] = sample.value
    return list(readings.values())


def from_prometheus(url: str, since_s: float, timeout_s: float = 10.0) -> list[Reading]:
    """increase() over the window for the counters, the latest value for memory."""
    window = f"{max(1, round(since_s))}s"
    readings: dict[tuple[str, str], Reading] = {}
    busy = f"sum by (model, version, device) (increase({BUSY}[{window}]))"
    for labels, value in _query(url, busy, timeout_s):
        r = _reading(readings, labels["model"], labels["version"])
        r.busy_s[labels.get("device", "cpu")] = value
    success = f"sum by (model, version) (increase({SUCCESS}[{window}]))"
    for labels, value in _query(url, success, timeout_s):
        _reading(readings, labels["model"], labels["version"]).inferences = value
    memory = f"max by (model, version, device) ({MEMORY})"
    for labels, value in _query(url, memory, timeout_s):
        r = _reading(readings, labels["model"], labels["version"])
        r.memory_bytes[labels.get("device", "cpu")] = value
    return list(readings.values())


def _query(url: str, promql: str, timeout_s: float) -> list[tuple[dict[str, str], float]]:
    address = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(address, timeout=timeout_s) as reply:
        body = json.loads(reply.read())
    if body.get("status") != "success":
        raise ValueError(f"Prometheus refused {promql!r}: {body.get('error', body)}")
    rows = []
    for item in body["data"]["result"]:
        labels = item["metric"]
        if "model" in labels and "version" in labels:
            rows.append((labels, float(item["value"][1])))
    return rows


def _metrics_url(server: str) -> str:
    """host:port or a URL, of the metrics port; /metrics added when no path is given."""
    if "://" not in server:
        server = "http://" + server
    parts = urllib.parse.urlsplit(server)
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
