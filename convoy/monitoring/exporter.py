"""Monitoring figures as Prometheus metrics, read from the monitors at scrape time.

Nothing is updated on a hot path: the collector asks the Monitors object for the
latest figures whenever Prometheus scrapes. Names (all documented in
docs/monitoring.md):

    convoy_drift_detected{model,version,input}            1 if the latest window drifted
    convoy_drift_score{model,version,input,feature}        distance (feature="" : the input)
    convoy_drift_p_value{model,version,input,feature}      corrected p-value (feature="" : min)
    convoy_drift_threshold{model,version,input}            p-values below it are drift
    convoy_drift_windows_total{model,version,input}        windows tested
    convoy_drift_alarms_total{model,version,input}         windows that drifted
    convoy_drift_reference_size{model,version,input}       reference rows
    convoy_drift_windows_dropped_total{model,version}      windows lost: the thread fell behind
    convoy_drift_sampled_requests_total{model,version}     requests copied into windows
    convoy_drift_nonfinite_rows_total{model,version,input,sample}  rows left out for NaN/inf
    convoy_drift_strings_skipped_total{model,version,input}  BYTES over the byte budget
    convoy_feedback_accuracy{model,version}                rolling top-1 accuracy
    convoy_feedback_error{model,version}                   rolling mean absolute error
    convoy_feedback_reference_accuracy{model,version}      from config.pbtxt
    convoy_feedback_reference_error{model,version}         from config.pbtxt
    convoy_feedback_window_size{model,version}             judgements in the rolling window
    convoy_feedback_accepted_total{model,version}
    convoy_feedback_refused_total{model,reason}
    convoy_feedback_predictions_kept{model}                predictions awaiting feedback

`input` names an output too for prediction drift; convoy_drift_*{input=...} covers both.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .registry import Monitors

_TENSOR = ["model", "version", "input"]
_FEATURE = ["model", "version", "input", "feature"]
_VERSION = ["model", "version"]
_NONFINITE = ["model", "version", "input", "sample"]  # sample: reference | window


class MonitoringCollector(Collector):
    def __init__(self, monitors: Monitors) -> None:
        self._monitors = monitors

    def describe(self) -> Iterator[Metric]:
        """Every family this collector can export (empty), so that a registry knows
        the names before the first model is monitored."""
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        for monitor in self._monitors.monitors():
            status = monitor.status()
            model_version = [status.model, status.version]
            f["dropped"].add_metric(model_version, status.windows_dropped)
            f["sampled"].add_metric(model_version, status.requests_sampled)
            for tensor in status.tensors:
                key = [*model_version, tensor.name]
                f["reference"].add_metric(key, tensor.reference_size)
                f["windows"].add_metric(key, tensor.windows)
                f["alarms"].add_metric(key, tensor.alarms)
                f["nonfinite"].add_metric([*key, "reference"], tensor.nonfinite_reference_rows)
                f["nonfinite"].add_metric([*key, "window"], tensor.nonfinite_window_rows)
                if tensor.strings_skipped is not None:  # a BYTES tensor
                    f["strings_skipped"].add_metric(key, tensor.strings_skipped)
                result = tensor.result
                if result is None:
                    continue  # no window yet: no figure rather than a misleading 0
                f["detected"].add_metric(key, 1.0 if result.is_drift else 0.0)
                f["threshold"].add_metric(key, result.threshold)
                f["score"].add_metric([*key, ""], result.distance)
                f["p_value"].add_metric([*key, ""], result.p_value)
                for feature in result.features:
                    f["score"].add_metric([*key, feature.name], feature.distance)
                    f["p_value"].add_metric([*key, feature.name], feature.p_value)
        for store in self._monitors.feedback_stores():
            f["kept"].add_metric([store.model], store.kept)
            for reason, count in store.refusals().items():
                f["refused"].add_metric([store.model, reason], count)
            for fig in store.figures():
                key = [store.model, fig.version]
                f["window"].add_metric(key, fig.window)
                f["accepted"].add_metric(key, fig.accepted)
                name = "accuracy" if fig.task == "classification" else "error"
                if fig.rolling is not None:
                    f[name].add_metric(key, fig.rolling)
                if fig.reference is not None:
                    f[f"reference_{name}"].add_metric(key, fig.reference)
        unknown = self._monitors.unknown_model_refusals
        if unknown:
            f["refused"].add_metric(["", "unknown_model"], unknown)
        return iter(f.values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        return {
            "detected": GaugeMetricFamily(
                "convoy_drift_detected", "1 if the latest window of this input drifted",
                labels=_TENSOR,
            ),
            "score": GaugeMetricFamily(
                "convoy_drift_score",
                "Drift distance of the latest window (normed Wasserstein, PSI, Jensen-Shannon "
                "or MMD^2 by test); feature=\"\" is the input's largest",
                labels=_FEATURE,
            ),
            "p_value": GaugeMetricFamily(
                "convoy_drift_p_value",
                "Corrected p-value of the latest window; feature=\"\" is the input's smallest",
                labels=_FEATURE,
            ),
            "threshold": GaugeMetricFamily(
                "convoy_drift_threshold", "p-values below this are drift (the significance)",
                labels=_TENSOR,
            ),
            "windows": CounterMetricFamily(
                "convoy_drift_windows", "Windows of sampled rows tested", labels=_TENSOR
            ),
            "alarms": CounterMetricFamily(
                "convoy_drift_alarms", "Windows whose test found drift", labels=_TENSOR
            ),
            "reference": GaugeMetricFamily(
                "convoy_drift_reference_size",
                "Reference rows the test compares with (while first:N collects: rows so far)",
                labels=_TENSOR,
            ),
            "dropped": CounterMetricFamily(
                "convoy_drift_windows_dropped",
                "Full windows dropped because the drift thread fell behind", labels=_VERSION,
            ),
            "sampled": CounterMetricFamily(
                "convoy_drift_sampled_requests", "Requests copied into drift windows",
                labels=_VERSION,
            ),
            "strings_skipped": CounterMetricFamily(
                "convoy_drift_strings_skipped",
                "Sampled BYTES strings not kept: over what was left of the request's "
                "64 KiB sampling budget",
                labels=_TENSOR,
            ),
            "nonfinite": CounterMetricFamily(
                "convoy_drift_nonfinite_rows",
                "Sampled rows left out because they hold NaN or infinite values: "
                "sample=reference (first:N) or window (before its test)",
                labels=_NONFINITE,
            ),
            "accuracy": GaugeMetricFamily(
                "convoy_feedback_accuracy", "Rolling top-1 accuracy judged by feedback",
                labels=_VERSION,
            ),
            "error": GaugeMetricFamily(
                "convoy_feedback_error", "Rolling mean absolute error judged by feedback",
                labels=_VERSION,
            ),
            "reference_accuracy": GaugeMetricFamily(
                "convoy_feedback_reference_accuracy",
                "Accuracy at validation (parameters.feedback_reference_accuracy)",
                labels=_VERSION,
            ),
            "reference_error": GaugeMetricFamily(
                "convoy_feedback_reference_error",
                "Mean absolute error at validation (parameters.feedback_reference_error)",
                labels=_VERSION,
            ),
            "window": GaugeMetricFamily(
                "convoy_feedback_window_size", "Judgements the rolling figure is computed over",
                labels=_VERSION,
            ),
            "accepted": CounterMetricFamily(
                "convoy_feedback_accepted", "Feedback judged", labels=_VERSION
            ),
            "refused": CounterMetricFamily(
                "convoy_feedback_refused", "Feedback refused, by reason", labels=["model", "reason"]
            ),
            "kept": GaugeMetricFamily(
                "convoy_feedback_predictions_kept", "Predictions kept awaiting feedback",
                labels=["model"],
            ),
        }  # fmt: skip
