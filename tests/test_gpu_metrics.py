"""GPU memory and utilisation series, read when Prometheus scrapes."""

from __future__ import annotations

from prometheus_client import generate_latest

from convoy.metrics import Metrics
from convoy.scheduling.devices import GpuReading, cuda_device_count, gpu_readings


def test_gpu_series_come_from_the_readings_at_scrape_time() -> None:
    readings: list[GpuReading] = []
    metrics = Metrics(gpus=lambda: readings)
    assert b"convoy_gpu_memory_used_bytes{" not in generate_latest(metrics.registry)
    readings.append(GpuReading(0, "NVIDIA H200", 2 << 30, 141 << 30, 1 << 30, 0.5))
    readings.append(GpuReading(1, "NVIDIA H200", 0, 141 << 30, 0, None))
    text = generate_latest(metrics.registry).decode()
    assert 'convoy_gpu_memory_used_bytes{gpu="0",name="NVIDIA H200"} 2.147483648e+09' in text
    assert 'convoy_gpu_memory_total_bytes{gpu="1",name="NVIDIA H200"}' in text
    assert 'convoy_gpu_memory_reserved_bytes{gpu="0",name="NVIDIA H200"} 1.073741824e+09' in text
    assert 'convoy_gpu_utilization{gpu="0",name="NVIDIA H200"} 0.5' in text
    assert 'convoy_gpu_utilization{gpu="1"' not in text  # no NVML reading: no sample


def test_readings_cover_only_gpus_this_process_uses() -> None:
    if cuda_device_count() == 0:
        assert gpu_readings() == []
        return
    import torch

    torch.zeros(1, device="cuda:0")
    (reading, *_) = gpu_readings()
    assert reading.index == 0 and 0 < reading.reserved_bytes <= reading.used_bytes
    assert reading.used_bytes <= reading.total_bytes
