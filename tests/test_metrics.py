"""Metrics that must stay right across reloads, and the pool counters read at scrape time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest

from convoy.batching.request import InferRequest
from convoy.metrics import Metrics, PoolReading
from convoy.repository.manager import ModelRepository
from convoy.statistics import ModelStatistics


def _text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_reload_hands_the_labels_to_the_new_version() -> None:
    """Issue 10 item 1: the old version closing after the new one started must not
    switch the shared series off."""
    metrics = Metrics(gpus=list)
    old = metrics.for_model("m", "1")
    old.watch(lambda: 3, lambda: 4)
    new = metrics.for_model("m", "1")
    new.watch(lambda: 5, lambda: 6)
    old.serving(False)
    old.release()
    text = _text(metrics)
    assert 'convoy_model_ready{model="m",version="1"} 1.0' in text
    assert 'convoy_queue_depth{model="m",version="1"} 5.0' in text
    assert 'convoy_inflight_requests{model="m",version="1"} 6.0' in text
    new.serving(False)
    new.release()
    text = _text(metrics)
    assert 'convoy_model_ready{model="m",version="1"} 0.0' in text
    assert 'convoy_queue_depth{model="m"' not in text


def test_pool_counters_and_failed_devices_are_exported() -> None:
    metrics = Metrics(gpus=list)
    metrics.watch_serving(
        lambda: [PoolReading("m", "2", fallbacks=3, spills=1, replaced=2)],
        lambda: {"cuda:1": "CUDA error: an illegal memory access was encountered"},
    )
    text = _text(metrics)
    assert 'convoy_gpu_fallbacks_total{model="m",version="2"} 3.0' in text
    assert 'convoy_cpu_spills_total{model="m",version="2"} 1.0' in text
    assert 'convoy_instance_replacements_total{model="m",version="2"} 2.0' in text
    assert 'convoy_device_failed{device="cuda:1"} 1.0' in text


def test_request_series_are_read_from_the_statistics_and_survive_a_reload() -> None:
    """Prometheus reads each version's ModelStatistics when scraped; a reload folds the
    old version's counts into the labels' totals, so no counter goes backwards."""
    metrics = Metrics(gpus=list)
    old = metrics.for_model("m", "1")
    old_stats = ModelStatistics("m", "1")
    old.read(old_stats)
    old_stats.record_request(True, 2_000_000, 300_000)
    old_stats.record_request(False, 0, None, "Overloaded")
    old_stats.record_batch(3, 1, 100, 1_000_000, 100, "cpu")
    new = metrics.for_model("m", "1")
    new_stats = ModelStatistics("m", "1")
    new.read(new_stats)
    old.release()
    new_stats.record_request(True, 50_000, 0)
    text = _text(metrics)
    assert 'convoy_request_success_total{model="m",version="1"} 2.0' in text
    assert 'convoy_request_failure_total{model="m",reason="Overloaded",version="1"} 1.0' in text
    assert 'convoy_request_seconds_bucket{le="0.0001",model="m",version="1"} 1.0' in text
    assert 'convoy_request_seconds_bucket{le="0.0025",model="m",version="1"} 2.0' in text
    assert 'convoy_request_seconds_count{model="m",version="1"} 2.0' in text
    assert 'convoy_queue_seconds_count{model="m",version="1"} 2.0' in text
    assert 'convoy_batch_size_bucket{le="4.0",model="m",version="1"} 1.0' in text
    assert 'convoy_compute_seconds_count{device="cpu",model="m",version="1"} 1.0' in text
    assert 'convoy_request_success_created{model="m",version="1"}' in text
    assert new_stats.success.count == 1  # Triton's statistics start again per version


def test_a_models_statistics_are_its_request_series_when_scraped() -> None:
    """One count per request (ModelStatistics), read by Prometheus at scrape time: an
    ensemble, which has no queue, counts the same way as a served model."""
    metrics = Metrics(gpus=list)
    stats = ModelStatistics("e", "1")
    metrics.for_model("e", "1").read(stats)
    stats.record_request(True, 3_000_000, None)
    stats.record_request(False, 0, None, "Cancelled")
    text = _text(metrics)
    assert 'convoy_request_success_total{model="e",version="1"} 1.0' in text
    assert 'convoy_request_seconds_sum{model="e",version="1"} 0.003' in text
    assert 'convoy_request_failure_total{model="e",reason="Cancelled",version="1"} 1.0' in text


_SLOW_STEP = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        time.sleep(0.5)
        return {"Y": inputs["X"] * 3}
"""
_PIPE = """
name: "pipe"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [ { model_name: "slow" model_version: -1
      input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } } ]
}
"""


def test_an_ensemble_request_running_across_its_reload_is_counted(tmp_path: Path) -> None:
    """The old version's statistics are folded into the totals only once its
    requests in flight have finished: a reload loses none of them."""
    (tmp_path / "slow" / "1").mkdir(parents=True)
    (tmp_path / "slow" / "1" / "model.py").write_text(_SLOW_STEP)
    (tmp_path / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nbackend: "convoy_python"\nmax_batch_size: 8\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    (tmp_path / "pipe" / "1").mkdir(parents=True)
    (tmp_path / "pipe" / "config.pbtxt").write_text(_PIPE)
    metrics = Metrics(gpus=list)

    async def scenario() -> str:
        repo = ModelRepository(tmp_path, metrics)
        await repo.load("slow")
        await repo.load("pipe")
        loop = asyncio.get_running_loop()
        request = InferRequest(
            id="1",
            inputs={"IN": np.ones((1, 4), dtype=np.float32)},
            outputs=("OUT",),
            rows=1,
            shape_key=(("IN", (4,)),),
            future=loop.create_future(),
            arrival_ns=1,
        )
        running = asyncio.ensure_future(repo.get("pipe").infer(request))
        await asyncio.sleep(0.1)
        await repo.load("pipe")  # a reload while the request runs its step
        await running
        text = _text(metrics)
        await repo.close()
        return text

    text = asyncio.run(scenario())
    assert 'convoy_request_success_total{model="pipe",version="1"} 1.0' in text
    assert 'convoy_request_success_total{model="slow",version="1"} 1.0' in text
