"""Every Prometheus metric Convoy exports, defined in one place.

Metrics live in a registry owned by the server (no global state). Hot paths
use ModelMetrics, whose label children are resolved once per model version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .batching.slo import SloController
from .scheduling.devices import GpuReading, gpu_readings

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        gpus: Callable[[], list[GpuReading]] = gpu_readings,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(GpuCollector(gpus))
        labels = ("model", "version")
        r = self.registry
        self.request_success = Counter(
            "convoy_request_success", "Inference requests answered with a result", labels,
            registry=r,
        )  # fmt: skip
        self.request_failure = Counter(
            "convoy_request_failure", "Inference requests answered with an error",
            (*labels, "reason"), registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "convoy_batch_size", "Rows per executed batch", labels, buckets=_BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "convoy_queue_seconds", "Time requests wait in the model queue", labels,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "convoy_compute_seconds", "Time to gather, run and split one batch",
            (*labels, "device"), buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "convoy_request_seconds", "End-to-end request latency inside the server", labels,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
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
        # (model, version) -> the ModelMetrics whose model currently serves those labels.
        # A reload builds the new version before closing the old one, and both share
        # the label children: only the current owner may switch them off.
        self._owners: dict[tuple[str, str], ModelMetrics] = {}

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def watch_serving(
        self,
        pools: Callable[[], Iterable[PoolReading]],
        failed_devices: Callable[[], Mapping[str, str]],
    ) -> None:
        """Instance-pool counters and failed devices, read at scrape time."""
        self.registry.register(ServingCollector(pools, failed_devices))


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


class ModelMetrics:
    """Label children bound once; cheap to update per request."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (model, version)
        self.success = metrics.request_success.labels(model, version)
        self.batch_size = metrics.batch_size.labels(model, version)
        self.queue_seconds = metrics.queue_seconds.labels(model, version)
        self.request_seconds = metrics.request_seconds.labels(model, version)
        self.ready = metrics.model_ready.labels(model, version)
        self._compute: dict[str, Histogram] = {}

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

    def failure(self, reason: str) -> Counter:
        return self._metrics.request_failure.labels(*self._labels, reason)

    def compute_seconds(self, device: str) -> Histogram:
        child = self._compute.get(device)
        if child is None:
            child = self._metrics.compute_seconds.labels(*self._labels, device)
            self._compute[device] = child
        return child
