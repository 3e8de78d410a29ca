"""Metrics that must stay right across reloads, and the pool counters read at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest

from server.metrics import Metrics, PoolReading


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
