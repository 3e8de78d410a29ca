"""`--cache-config` as Triton reads it, the per-request switch, and the metrics."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from convoy.batching.request import InferResult
from convoy.cache import (
    CacheConfig,
    CacheConfigError,
    ResponseCache,
    parse_cache_config,
    request_key,
    request_uses_cache,
)
from convoy.cache.exporter import CacheCollector
from convoy.errors import InvalidInput


@pytest.mark.parametrize(
    ("values", "size"),
    [
        (["local,size=1048576"], 1048576),
        (["local,size=256MiB"], 256 << 20),
        (["local,size=4KiB"], 4096),
        (["local, size=1GiB"], 1 << 30),
    ],
)
def test_cache_config_sizes(values: list[str], size: int) -> None:
    assert parse_cache_config(values) == CacheConfig(size_bytes=size, implementation="local")


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ([], "expected local,size=BYTES"),
        (["redis,host=x"], "unknown cache 'redis'"),
        (["local"], "expected local,size=BYTES"),
        (["local,size"], "'size' is not key=value"),
        (["local,bytes=10"], "unknown key 'bytes'"),
        (["local,size=10MB"], "is not a byte count"),
        (["local,size=-1"], "is not a byte count"),
        (["local,size=0"], "size must be > 0"),
        (["local,size=1", "local,size=2"], "'size' is given twice"),
    ],
)
def test_cache_config_errors_say_what_to_write(values: list[str], complaint: str) -> None:
    with pytest.raises(CacheConfigError, match=complaint):
        parse_cache_config(values)


def test_the_bypass_parameter_takes_a_bool_only() -> None:
    assert request_uses_cache(None, None)
    assert request_uses_cache("bool_param", True)
    assert not request_uses_cache("bool_param", False)
    with pytest.raises(InvalidInput, match="'response_cache' must be a bool, got string_param"):
        request_uses_cache("string_param", "false")


def test_metrics_read_the_cache_at_scrape_time() -> None:
    cache = ResponseCache(CacheConfig(size_bytes=1 << 20))
    registry = CollectorRegistry()
    registry.register(CacheCollector(cache))
    assert "convoy_cache_capacity_bytes 1.048576e+06" in generate_latest(registry).decode()
    key = request_key("m", 2, {"X": np.zeros(3)}, ("Y",))
    assert cache.lookup(key) is None and cache.begin(key) is None
    cache.complete(key, InferResult({"Y": np.zeros((1, 10), np.float32)}))
    assert cache.lookup(key) is not None
    text = generate_latest(registry).decode()
    assert 'convoy_cache_hits_total{model="m",version="2"} 1.0' in text
    assert 'convoy_cache_misses_total{model="m",version="2"} 1.0' in text
    assert 'convoy_cache_entries{model="m",version="2"} 1.0' in text
    assert f'convoy_cache_bytes{{model="m",version="2"}} {float(cache.bytes_used)}' in text
    assert 'convoy_cache_evictions_total{model="m",version="2"} 0.0' in text
