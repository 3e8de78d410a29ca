"""Prometheus view of the response cache, read at scrape time.

    convoy_cache_hits_total{model,version}       answered without running the model
                                                 (coalesced followers included)
    convoy_cache_misses_total{model,version}     computed, then stored
    convoy_cache_coalesced_total{model,version}  waited for an identical request in flight
    convoy_cache_evictions_total{model,version}  entries dropped to make room
    convoy_cache_entries{model,version}          entries held now
    convoy_cache_bytes{model,version}            bytes held now (the number the limit bounds)
    convoy_cache_capacity_bytes                  the --cache-config size

A collector rather than metric objects: the request path only bumps plain integers.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .cache import ResponseCache


class CacheCollector(Collector):
    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read only when scraped, not when registered

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        hits = CounterMetricFamily(
            "convoy_cache_hits",
            "Requests answered from the response cache or by an identical request in flight",
            labels=labels,
        )
        misses = CounterMetricFamily(
            "convoy_cache_misses", "Requests the response cache did not hold", labels=labels
        )
        coalesced = CounterMetricFamily(
            "convoy_cache_coalesced",
            "Requests that waited for an identical request's computation",
            labels=labels,
        )
        evictions = CounterMetricFamily(
            "convoy_cache_evictions", "Entries evicted to stay within the size", labels=labels
        )
        entries = GaugeMetricFamily(
            "convoy_cache_entries", "Responses held in the cache", labels=labels
        )
        used = GaugeMetricFamily(
            "convoy_cache_bytes", "Bytes the response cache holds", labels=labels
        )
        for (model, version), stats in sorted(self._cache.all_stats().items()):
            at = [model, str(version)]
            hits.add_metric(at, stats.hits)
            misses.add_metric(at, stats.misses)
            coalesced.add_metric(at, stats.coalesced)
            evictions.add_metric(at, stats.evictions)
            entries.add_metric(at, stats.entries)
            used.add_metric(at, stats.bytes_used)
        capacity = GaugeMetricFamily(
            "convoy_cache_capacity_bytes", "The response cache's size (--cache-config)"
        )
        capacity.add_metric([], self._cache.capacity_bytes)
        yield from (hits, misses, coalesced, evictions, entries, used, capacity)
