"""Every Prometheus metric Convoy exports, defined in one place.

Metrics live in a registry owned by the server (no global state). Per-request
series are not counted here: a served model's ModelStatistics counts each request
once and ModelSeriesCollector reads it when scraped, so the hot path takes no
prometheus_client locks.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .batching.slo import SloController
from .scheduling.devices import GpuReading, gpu_readings
from .statistics import Histogram, ModelStatistics, latency_histogram


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        gpus: Callable[[], list[GpuReading]] = gpu_readings,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(GpuCollector(gpus))
        # What every Prometheus-instrumented Python process exports (CPU, memory, file
        # descriptors, collections per generation), here in the server's own registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        labels = ("model", "version")
        r = self.registry
        self.series = ModelSeriesCollector()
        r.register(self.series)
        self.queue_depth = Gauge(
            "convoy_queue_depth", "Requests waiting in the model queue", labels, registry=r
        )
        self.inflight = Gauge(
            "convoy_inflight_requests", "Requests accepted and not yet answered", labels,
            registry=r,
        )  # fmt: skip
        self.slo_batch_limit = Gauge(
            "convoy_slo_batch_limit", "Batch-size limit chosen by latency-SLO batching", labels,
            registry=r,
        )  # fmt: skip
        self.slo_queue_delay = Gauge(
            "convoy_slo_queue_delay_seconds", "Queue delay chosen by latency-SLO batching",
            labels, registry=r,
        )  # fmt: skip
        self.slo_p99 = Gauge(
            "convoy_slo_measured_p99_seconds", "p99 latency of the last SLO window", labels,
            registry=r,
        )  # fmt: skip
        self.slo_target = Gauge(
            "convoy_slo_target_p99_seconds", "The configured p99 latency target", labels,
            registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            "convoy_model_ready", "1 while the model version serves", labels, registry=r
        )
        # Counted where a load fails (start-up, RepositoryModelLoad, the repository poll
        # and each of its retries, a rollout loading its candidate): rare, off the hot path.
        # version "": the model as a whole failed (config.pbtxt, version policy, ensemble).
        self.model_load_failures = Counter(
            "convoy_model_load_failures", "Loads of a model version that failed", labels,
            registry=r,
        )  # fmt: skip
        # Service-level objectives (monitoring/burn.py), read when scraped: none until
        # the server declares some (watch_slos).
        self.slos = SloCollector()
        r.register(self.slos)
        # Model lifecycle (docs/models.md): rare events, counted where they happen.
        self.model_loads = Counter(
            "convoy_model_loads", "Model loads that succeeded, by what asked for them "
            "(first_request, explicit, poll)", ("model", "reason"), registry=r,
        )  # fmt: skip
        self.model_evictions = Counter(
            "convoy_model_evictions", "Models unloaded by on-demand loading (memory, idle)",
            ("model", "reason"), registry=r,
        )  # fmt: skip
        self.model_load_seconds = PromHistogram(
            "convoy_model_load_seconds", "Time to load a model: the cold start its first "
            "callers wait for", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120),
        )  # fmt: skip
        self.model_waiting = Gauge(
            "convoy_model_waiting_requests", "Requests waiting for their model to load",
            ("model",), registry=r,
        )  # fmt: skip
        self.model_memory = Gauge(
            "convoy_model_memory_bytes", "Memory a loaded model version took, measured at "
            "its load (device cpu: resident; cuda:N: that GPU's)",
            ("model", "version", "device"), registry=r,
        )  # fmt: skip
        # Per batch, not per request; kept after an unload, so totals since start-up
        # include evicted models (convoy cost).
        self.model_busy = Counter(
            "convoy_model_busy_seconds", "Instance time spent executing batches",
            ("model", "version", "device"), registry=r,
        )  # fmt: skip
        # (model, version) -> the ModelMetrics whose model currently serves those labels.
        # A reload builds the new version before closing the old one, and both share
        # the label children: only the current owner may switch them off.
        self._owners: dict[tuple[str, str], ModelMetrics] = {}
        self.features = FeatureMetrics(r)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version, self.series.series(model, version))

    def watch_serving(
        self,
        pools: Callable[[], Iterable[PoolReading]],
        failed_devices: Callable[[], Mapping[str, str]],
    ) -> None:
        """Instance-pool counters and failed devices, read at scrape time."""
        self.registry.register(ServingCollector(pools, failed_devices))

    def watch_background(self, read: Callable[[], BackgroundReading]) -> None:
        """The background loop budget's counters (--background-loop-share), read at
        scrape time."""
        self.registry.register(BackgroundCollector(read))


@dataclass(frozen=True)
class SloReading:
    model: str
    slo: str
    target: float  # the objective as a ratio: 99.9% -> 0.999
    # Events since start, and burn rates by window (5m, 30m, 1h, 6h); None where the
    # server does not count the objective's events (quality: the drift counters).
    counts: SloCounts | None


@dataclass(frozen=True)
class SloCounts:
    good: int
    bad: int
    burn_rates: Mapping[str, float]


class SloCollector(Collector):
    """convoy_slo_objective, convoy_slo_burn_rate, convoy_slo_events_total (what the
    generated recording rules read) and convoy_slo_shed_total, from the server's
    SloTracker at scrape time: its counting on the loop takes no metric lock."""

    def __init__(self) -> None:
        self._readings: Callable[[], Iterable[SloReading]] = tuple
        self._shed: Callable[[], Mapping[tuple[str, str], int]] = dict

    def watch(
        self,
        readings: Callable[[], Iterable[SloReading]],
        shed: Callable[[], Mapping[tuple[str, str], int]],
    ) -> None:
        self._readings = readings
        self._shed = shed

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        objective = GaugeMetricFamily(
            "convoy_slo_objective", "The objective's target, a ratio of good events",
            labels=["model", "slo"],
        )  # fmt: skip
        burn = GaugeMetricFamily(
            "convoy_slo_burn_rate",
            "Error-budget burn rate over the window, from the server's own counts "
            "(1: the budget lasts exactly its period)",
            labels=["model", "slo", "window"],
        )
        events = CounterMetricFamily(
            "convoy_slo_events",
            "Requests counted by an availability or latency objective, good or bad",
            labels=["model", "slo", "good"],
        )
        shed = CounterMetricFamily(
            "convoy_slo_shed",
            "Background requests refused while the model's budget burned fast",
            labels=["model", "reason"],
        )
        for reading in self._readings():
            key = [reading.model, reading.slo]
            objective.add_metric(key, reading.target)
            counts = reading.counts
            if counts is None:
                continue
            for window, rate in counts.burn_rates.items():
                burn.add_metric([*key, window], rate)
            events.add_metric([*key, "true"], counts.good)
            events.add_metric([*key, "false"], counts.bad)
        for (model, reason), count in sorted(list(self._shed().items())):
            shed.add_metric([model, reason], count)
        yield from (objective, burn, events, shed)


@dataclass(frozen=True)
class PoolReading:
    model: str
    version: str
    fallbacks: int  # batches retried on a CPU instance after a device fault
    spills: int  # batches a CPU instance took because the GPUs stayed busy
    replaced: int  # instances rebuilt after an execution timeout


class ServingCollector(Collector):
    """Counters the instance pools keep anyway, exported when scraped rather than
    counted twice on the hot path. A reload starts a version's counters again at
    zero, which rate() reads as a counter reset."""

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolReading]],
        failed_devices: Callable[[], Mapping[str, str]],
    ) -> None:
        self._pools = pools
        self._failed = failed_devices

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        fallbacks = CounterMetricFamily(
            "convoy_gpu_fallbacks",
            "Batches retried on a CPU instance after a GPU device fault",
            labels=labels,
        )
        spills = CounterMetricFamily(
            "convoy_cpu_spills", "Batches sent to a CPU instance while the GPUs were busy",
            labels=labels,
        )  # fmt: skip
        replaced = CounterMetricFamily(
            "convoy_instance_replacements",
            "Instances rebuilt after running past the execution timeout",
            labels=labels,
        )
        for pool in self._pools():
            key = [pool.model, pool.version]
            fallbacks.add_metric(key, pool.fallbacks)
            spills.add_metric(key, pool.spills)
            replaced.add_metric(key, pool.replaced)
        failed = GaugeMetricFamily(
            "convoy_device_failed",
            "1 for a GPU failed for good by an unrecoverable CUDA error (until restart)",
            labels=["device"],
        )
        for device in sorted(self._failed()):
            failed.add_metric([device], 1)
        yield from (fallbacks, spills, replaced, failed)


@dataclass(frozen=True)
class BackgroundReading:
    waits: int  # background requests that waited for the loop budget, since start
    waited_s: float  # their time waiting
    loop_s: float  # loop time charged to background requests, callers about or not


class BackgroundCollector(Collector):
    """convoy_background_budget_*: how background work was paced beside callers, from
    the counters the inference path keeps anyway (no metric lock on the loop)."""

    def __init__(self, read: Callable[[], BackgroundReading]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        reading = self._read()
        waits = CounterMetricFamily(
            "convoy_background_budget_waits",
            "Background requests that waited for their share of the event loop "
            "while callers were about",
        )
        waits.add_metric([], reading.waits)
        waited = CounterMetricFamily(
            "convoy_background_budget_wait_seconds",
            "Time background requests waited for their share of the event loop",
        )
        waited.add_metric([], reading.waited_s)
        loop = CounterMetricFamily(
            "convoy_background_loop_seconds",
            "Event-loop time charged to background requests (timed parts plus a "
            "per-request estimate of gRPC's)",
        )
        loop.add_metric([], reading.loop_s)
        yield from (waits, waited, loop)


class GpuCollector(Collector):
    """Per-GPU memory and utilisation, read at scrape time (never on a hot path),
    labelled by GPU index as Triton's nv_gpu_* series are."""

    def __init__(self, read: Callable[[], list[GpuReading]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read only when scraped, not when registered

    def collect(self) -> Iterator[Metric]:
        labels = ["gpu", "name"]
        used = GaugeMetricFamily(
            "convoy_gpu_memory_used_bytes", "GPU memory in use, all processes", labels=labels
        )
        total = GaugeMetricFamily(
            "convoy_gpu_memory_total_bytes", "GPU memory on the device", labels=labels
        )
        reserved = GaugeMetricFamily(
            "convoy_gpu_memory_reserved_bytes", "GPU memory held by this server", labels=labels
        )
        busy = GaugeMetricFamily(
            "convoy_gpu_utilization", "GPU busy fraction (NVML's last sample)", labels=labels
        )
        for gpu in self._read():
            key = [str(gpu.index), gpu.name]
            used.add_metric(key, gpu.used_bytes)
            total.add_metric(key, gpu.total_bytes)
            reserved.add_metric(key, gpu.reserved_bytes)
            if gpu.utilization is not None:
                busy.add_metric(key, gpu.utilization)
        yield from (used, total, reserved, busy)


@dataclass
class ModelSeries:
    """The request series of one (model, version) label set: what versions that were
    replaced or unloaded counted (folded into `totals`, which also takes the direct
    counts of an ensemble), plus the statistics of the versions serving now. Outlives
    any one version, so a reload keeps counting where the last one stopped."""

    model: str
    version: str
    totals: ModelStatistics
    live: list[ModelStatistics] = field(default_factory=list)
    created: dict[str, float] = field(default_factory=dict)  # series key -> first seen

    def first_seen(self, key: str, now: float) -> float:
        return self.created.setdefault(key, now)


_REQUEST_LABELS = ["model", "version"]


class ModelSeriesCollector(Collector):
    """convoy_request_success/_failure, convoy_{request,queue,compute}_seconds and
    convoy_batch_size, summed at scrape time from each label set's ModelSeries.

    The lock orders a scrape (the metrics server's thread) against a version's
    statistics being folded into the totals (on the loop); the per-request updates
    take no lock: a scrape may read a histogram mid-update, one observation off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], ModelSeries] = {}

    def series(self, model: str, version: str) -> ModelSeries:
        with self._lock:
            found = self._series.get((model, version))
            if found is None:
                totals = ModelStatistics(name=model, version=version)
                found = self._series[(model, version)] = ModelSeries(model, version, totals)
                now = time.time()
                for key in ("success", "request", "queue", "batch"):
                    found.first_seen(key, now)
            return found

    def read(self, series: ModelSeries, stats: ModelStatistics) -> None:
        with self._lock:
            series.live.append(stats)

    def fold(self, series: ModelSeries, stats: ModelStatistics) -> None:
        """A version stops serving: keep what its statistics counted in the totals."""
        with self._lock:
            if any(s is stats for s in series.live):
                series.totals.absorb(stats)
                series.live = [s for s in series.live if s is not stats]

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        success = CounterMetricFamily(
            "convoy_request_success", "Inference requests answered with a result",
            labels=_REQUEST_LABELS,
        )  # fmt: skip
        failure = CounterMetricFamily(
            "convoy_request_failure", "Inference requests answered with an error",
            labels=[*_REQUEST_LABELS, "reason"],
        )  # fmt: skip
        batch = HistogramMetricFamily(
            "convoy_batch_size", "Rows per executed batch", labels=_REQUEST_LABELS
        )
        queue = HistogramMetricFamily(
            "convoy_queue_seconds", "Time requests wait in the model queue",
            labels=_REQUEST_LABELS,
        )  # fmt: skip
        compute = HistogramMetricFamily(
            "convoy_compute_seconds", "Time to gather, run and split one batch",
            labels=[*_REQUEST_LABELS, "device"],
        )  # fmt: skip
        request = HistogramMetricFamily(
            "convoy_request_seconds", "End-to-end request latency inside the server",
            labels=_REQUEST_LABELS,
        )  # fmt: skip
        now = time.time()
        with self._lock:
            for series in list(self._series.values()):
                readings = [series.totals, *series.live]
                key = [series.model, series.version]
                success.add_metric(
                    key, sum(r.success.count for r in readings), series.first_seen("success", now)
                )
                failures: dict[str, int] = {}
                for reading in readings:
                    for reason, count in list(reading.failures.items()):
                        failures[reason] = failures.get(reason, 0) + count
                for reason in sorted(failures):
                    created = series.first_seen("failure:" + reason, now)
                    failure.add_metric([*key, reason], failures[reason], created)
                _add_histogram(
                    batch, _REQUEST_LABELS, key, [r.batch_rows for r in readings], series, "batch"
                )
                _add_histogram(
                    queue,
                    _REQUEST_LABELS,
                    key,
                    [r.queue_seconds for r in readings],
                    series,
                    "queue",
                )
                devices: dict[str, list[Histogram]] = {}
                for reading in readings:
                    for device, histogram in list(reading.compute_seconds.items()):
                        devices.setdefault(device, []).append(histogram)
                for device in sorted(devices):
                    _add_histogram(
                        compute,
                        [*_REQUEST_LABELS, "device"],
                        [*key, device],
                        devices[device],
                        series,
                        "compute:" + device,
                    )
                _add_histogram(
                    request,
                    _REQUEST_LABELS,
                    key,
                    [r.request_seconds for r in readings],
                    series,
                    "request",
                )
        yield from (success, failure, batch, queue, compute, request)


def _add_histogram(
    family: HistogramMetricFamily,
    names: list[str],
    labels: list[str],
    parts: list[Histogram],
    series: ModelSeries,
    created_key: str,
) -> None:
    """One labelled histogram, the sum of `parts`, as prometheus_client's Histogram
    exposes it: cumulative buckets, count, sum and _created."""
    total = latency_histogram() if not parts else Histogram(parts[0].bounds)
    for part in parts:
        total.absorb(Histogram(part.bounds, list(part.counts), part.sum))
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for le, count in zip(_le_labels(total.bounds), total.counts, strict=True):
        cumulative += count
        buckets.append((le, cumulative))
    family.add_metric(labels, buckets, total.sum)
    created = series.first_seen(created_key, time.time())
    family.samples.append(
        Sample(family.name + "_created", dict(zip(names, labels, strict=True)), created)
    )


@functools.cache
def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The `le` label of each bucket, +Inf last, spelled as prometheus_client does."""
    return tuple(floatToGoString(b) for b in (*bounds, float("inf")))  # type: ignore[no-untyped-call]


class ModelMetrics:
    """One model version's series. The model hands its ModelStatistics over with
    read(): the request series are read from them when scraped."""

    def __init__(self, metrics: Metrics, model: str, version: str, series: ModelSeries) -> None:
        self._metrics = metrics
        self._labels = (model, version)
        self._series = series
        self._read: ModelStatistics | None = None
        self.ready = metrics.model_ready.labels(model, version)
        self._busy: dict[str, Counter] = {}  # device -> its convoy_model_busy_seconds

    def busy(self, device: str, ns: int) -> None:
        """A batch's time on an instance (InstancePool.on_busy): counted for good."""
        counter = self._busy.get(device)
        if counter is None:
            counter = self._busy[device] = self._metrics.model_busy.labels(*self._labels, device)
        counter.inc(ns / 1e9)

    def read(self, stats: ModelStatistics) -> None:
        """Export `stats` (this version's own counts) under this version's labels
        until release()."""
        self._read = stats
        self._metrics.series.read(self._series, stats)

    @property
    def owns_labels(self) -> bool:
        """True while this model version is the one its labels report on."""
        return self._metrics._owners.get(self._labels) is self

    def watch(self, queue_depth: Callable[[], float], inflight: Callable[[], float]) -> None:
        """Take the labels over and point the gauges at this model version; they are
        read when scraped, so the hot path never touches them."""
        self._metrics._owners[self._labels] = self
        self._metrics.queue_depth.labels(*self._labels).set_function(queue_depth)
        self._metrics.inflight.labels(*self._labels).set_function(inflight)
        self.ready.set(1)

    def serving(self, ready: bool) -> None:
        """convoy_model_ready for this version, if it still owns the labels."""
        if self.owns_labels:
            self.ready.set(1 if ready else 0)

    def watch_slo(self, slo: SloController) -> None:
        m = self._metrics
        m.slo_batch_limit.labels(*self._labels).set_function(lambda: slo.batch_limit)
        m.slo_queue_delay.labels(*self._labels).set_function(lambda: slo.delay_ns / 1e9)
        m.slo_p99.labels(*self._labels).set_function(lambda: slo.last_p99_ns / 1e9)
        m.slo_target.labels(*self._labels).set(slo.target_ns / 1e9)

    def release(self) -> None:
        """Drop the gauges that point at an unloaded model, unless a reload has
        already handed the labels to its successor."""
        m = self._metrics
        if self._read is not None:
            m.series.fold(self._series, self._read)
            self._read = None
        if m._owners.get(self._labels) is not self:
            return
        del m._owners[self._labels]
        gauges = (m.queue_depth, m.inflight, m.slo_batch_limit, m.slo_queue_delay, m.slo_p99)
        for gauge in (*gauges, m.slo_target):
            try:
                gauge.remove(*self._labels)
            except KeyError:
                pass
        self.ready.set(0)


# Feature ages: from a second (just materialised) to a week (a forgotten job).
STALENESS_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400)


class FeatureMetrics:
    """Feature-store lookups (convoy/features/): observed once per batch on the instance's
    thread, off the loop, so prometheus_client's locks cost no caller anything."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookup_seconds = PromHistogram(
            "convoy_feature_lookup_seconds", "Time of one batch's online feature lookup",
            ("model",), registry=registry,
        )  # fmt: skip
        self.missing = Counter(
            "convoy_feature_missing_total", "Rows the online store had no value of a feature for",
            ("model", "feature"), registry=registry,
        )  # fmt: skip
        self.staleness = PromHistogram(
            "convoy_feature_staleness_seconds",
            "Age of each served feature value (lookup time minus its feature timestamp)",
            ("model", "feature"), buckets=STALENESS_BUCKETS, registry=registry,
        )  # fmt: skip

    def observe(
        self,
        model: str,
        seconds: float,
        missing: Mapping[str, int],
        ages_s: Mapping[str, Iterable[float]],
    ) -> None:
        self.lookup_seconds.labels(model).observe(seconds)
        for feature, count in missing.items():
            if count:
                self.missing.labels(model, feature).inc(count)
        for feature, ages in ages_s.items():
            child = self.staleness.labels(model, feature)
            for age in ages:
                child.observe(age)
