"""The byte-bounded LRU and the facade's accounting of it."""

from __future__ import annotations

import numpy as np
import pytest

from convoy.batching.request import InferResult
from convoy.cache import ByteLRU, CacheConfig, ResponseCache, request_key, result_bytes
from convoy.cache.lru import ENTRY_OVERHEAD_BYTES


def test_never_exceeds_its_size_under_a_stream_of_distinct_entries() -> None:
    lru: ByteLRU[int, str] = ByteLRU(10_000)
    rng = np.random.default_rng(0)
    for i in range(2_000):
        assert lru.put(i, "v", int(rng.integers(0, 3_000)))
        assert lru.bytes_used <= 10_000
    assert lru.evictions == 2_000 - len(lru)
    assert lru.bytes_used == sum(lru.size_of(k) for k in lru.keys())


def test_least_recently_used_goes_first() -> None:
    size = 100
    lru: ByteLRU[str, int] = ByteLRU(3 * (size + ENTRY_OVERHEAD_BYTES))
    for name in "abc":
        lru.put(name, ord(name), size)
    assert lru.get("a") == ord("a")  # a is now the most recent: b goes next
    lru.put("d", 0, size)
    assert list(lru.keys()) == ["c", "a", "d"]
    lru.put("e", 0, size)
    assert list(lru.keys()) == ["a", "d", "e"]
    assert lru.get("b") is None and lru.evictions == 2


def test_an_entry_larger_than_the_cache_is_refused_without_evicting() -> None:
    lru: ByteLRU[str, int] = ByteLRU(2_000)
    lru.put("small", 1, 10)
    assert not lru.put("huge", 2, 5_000)
    assert list(lru.keys()) == ["small"] and lru.evictions == 0


def test_replacing_a_key_recounts_its_bytes() -> None:
    lru: ByteLRU[str, int] = ByteLRU(10_000)
    lru.put("a", 1, 100)
    lru.put("a", 2, 300)
    assert lru.get("a") == 2 and lru.bytes_used == 300 + ENTRY_OVERHEAD_BYTES


def _result(rows: int, seed: int) -> InferResult:
    batch = np.random.default_rng(seed).standard_normal((64, 1000)).astype(np.float32)
    return InferResult({"LOGITS": batch[:rows]})  # a view of a bigger batch, as split_outputs


def test_the_cache_counts_what_it_holds_not_the_batch_a_view_came_from() -> None:
    cache = ResponseCache(CacheConfig(size_bytes=1 << 20))
    key = request_key("m", 1, {"X": np.zeros(1)}, ("LOGITS",))
    assert cache.begin(key) is None
    stored = cache.complete(key, _result(1, 0))
    assert stored.outputs["LOGITS"].base is None  # compacted: the 64-row batch can go
    assert not stored.outputs["LOGITS"].flags.writeable
    held = cache.stats("m", 1).bytes_used
    assert 4_000 < held < 4_000 + 2 * ENTRY_OVERHEAD_BYTES + 1_000
    assert held == result_bytes(stored) + ENTRY_OVERHEAD_BYTES == cache.bytes_used


def test_a_stored_result_keeps_the_inputs_the_server_added_and_counts_them() -> None:
    cache = ResponseCache(CacheConfig(size_bytes=1 << 20))
    key = request_key("m", 1, {"X": np.zeros(1)}, ("LOGITS",))
    assert cache.begin(key) is None
    features = np.arange(2_000, dtype=np.float64)
    plain = result_bytes(_result(1, 0))
    stored = cache.complete(key, InferResult(_result(1, 0).outputs, {}, {"f": features[:1000]}))
    # A hit is captured with the features the cached answer was computed from.
    hit = cache.lookup(key)
    assert hit is not None and hit.added_inputs["f"].tolist() == list(range(1000))
    assert stored.added_inputs["f"].base is None and not stored.added_inputs["f"].flags.writeable
    assert result_bytes(stored) >= plain + 8_000


def test_the_cache_stays_within_its_size_and_counts_evictions_per_model() -> None:
    capacity = 100_000
    cache = ResponseCache(CacheConfig(size_bytes=capacity))
    for i in range(200):
        model = "a" if i % 2 else "b"
        key = request_key(model, 1, {"X": np.array([i])}, ("LOGITS",))
        assert cache.lookup(key) is None and cache.begin(key) is None
        cache.complete(key, _result(1 + i % 5, i))
        assert cache.bytes_used <= capacity
    a, b = cache.stats("a", 1), cache.stats("b", 1)
    assert a.misses == b.misses == 100
    assert a.evictions + b.evictions == 200 - cache.entries
    assert a.bytes_used + b.bytes_used == cache.bytes_used
    assert a.entries + b.entries == cache.entries


def test_a_result_too_big_for_the_cache_is_answered_but_not_stored() -> None:
    cache = ResponseCache(CacheConfig(size_bytes=2_000))
    key = request_key("m", 1, {"X": np.zeros(1)}, ("LOGITS",))
    cache.begin(key)
    stored = cache.complete(key, _result(4, 0))
    assert stored.outputs["LOGITS"].shape == (4, 1000)
    assert cache.entries == 0 and cache.bytes_used == 0 and cache.lookup(key) is None


@pytest.mark.parametrize("version", [None, 1])
def test_clear_model_empties_its_entries_only(version: int | None) -> None:
    cache = ResponseCache(CacheConfig(size_bytes=1 << 20))
    keys = [request_key(m, 1, {"X": np.array([i])}, ("L",)) for m in "ab" for i in range(3)]
    for key in keys:
        cache.begin(key)
        cache.complete(key, _result(1, 0))
    assert cache.clear_model("a", version) == 3
    assert [cache.lookup(k) is None for k in keys] == [True] * 3 + [False] * 3
    assert cache.stats("a", 1).bytes_used == 0 and cache.stats("a", 1).entries == 0
    assert cache.bytes_used == cache.stats("b", 1).bytes_used > 0
    assert cache.stats("a", 1).misses == 3  # counters survive, as Prometheus needs
