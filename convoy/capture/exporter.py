"""Prometheus view of the capture, read at scrape time.

convoy_capture_rows_total{model,version}            rows written to Parquet files
convoy_capture_dropped_total{model,version,reason}  rows not written: buffer_full (the
                                                    --capture-max-mib budget), write_error
convoy_capture_labels_total{model}                  labels (Feedback RPC) written
convoy_capture_labels_dropped_total{model,reason}   labels not written: buffer_full, write_error
convoy_capture_bytes_total                          bytes of Parquet files written (both kinds)
convoy_capture_files_total                          Parquet files written (both kinds)
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .writer import CaptureCounts


class CaptureCollector(Collector):
    def __init__(self, counts: CaptureCounts) -> None:
        self._counts = counts

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read only when scraped, not when registered

    def collect(self) -> Iterator[Metric]:
        counts = self._counts
        rows = CounterMetricFamily(
            "convoy_capture_rows",
            "Captured requests written to Parquet",
            labels=["model", "version"],
        )
        for (model, version), n in sorted(dict(counts.rows).items()):
            rows.add_metric([model, version], n)
        dropped = CounterMetricFamily(
            "convoy_capture_dropped",
            "Captured requests not written (buffer_full, write_error)",
            labels=["model", "version", "reason"],
        )
        for (model, version, reason), n in sorted(dict(counts.dropped).items()):
            dropped.add_metric([model, version, reason], n)
        written = CounterMetricFamily("convoy_capture_bytes", "Bytes of capture files written")
        written.add_metric([], counts.bytes)
        files = CounterMetricFamily("convoy_capture_files", "Capture files written")
        files.add_metric([], counts.files)
        labels = CounterMetricFamily(
            "convoy_capture_labels", "Feedback labels written to Parquet", labels=["model"]
        )
        for model, n in sorted(dict(counts.labels).items()):
            labels.add_metric([model], n)
        labels_dropped = CounterMetricFamily(
            "convoy_capture_labels_dropped",
            "Feedback labels not written (buffer_full, write_error)",
            labels=["model", "reason"],
        )
        for (model, reason), n in sorted(dict(counts.labels_dropped).items()):
            labels_dropped.add_metric([model, reason], n)
        yield from (rows, dropped, labels, labels_dropped, written, files)
