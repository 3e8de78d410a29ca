"""An LRU map bounded by the bytes its entries hold, not by their number.

Event-loop only, so no locking. Entry sizes are given by the caller (see
`result_bytes` in cache.py); the map only guarantees that their sum, plus its own
per-entry overhead, never exceeds the capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# What an entry costs beyond its values: the OrderedDict node and hash slot, the
# key object with its digest, the size bookkeeping. tracemalloc on CPython 3.11:
# about 195 bytes of map entry plus 170 of CacheKey with its 32-byte digest, and
# result_bytes undercounts a small InferResult by about 80; rounded up.
ENTRY_OVERHEAD_BYTES = 512


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int  # value bytes + ENTRY_OVERHEAD_BYTES


class ByteLRU(Generic[K, V]):
    def __init__(
        self, capacity_bytes: int, on_evict: Callable[[K, int], None] | None = None
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.bytes_used = 0
        self.evictions = 0
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._on_evict = on_evict  # told of each eviction (not of removals): per-model counts

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[K]:
        """Least recently used first."""
        return iter(self._entries)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: K, value: V, value_bytes: int) -> bool:
        """Store `value` as most recently used, evicting the least recently used until
        it fits. False, storing nothing, when it alone exceeds the capacity: evicting
        everything for an entry that still would not fit helps nobody."""
        size = value_bytes + ENTRY_OVERHEAD_BYTES
        if size > self.capacity_bytes:
            return False
        self.remove(key)
        while self.bytes_used + size > self.capacity_bytes:
            old_key, old = self._entries.popitem(last=False)
            self.bytes_used -= old.size
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(old_key, old.size)
        self._entries[key] = _Entry(value, size)
        self.bytes_used += size
        return True

    def remove(self, key: K) -> int:
        """Drop `key` if present (not an eviction); the bytes freed."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        self.bytes_used -= entry.size
        return entry.size

    def size_of(self, key: K) -> int:
        """Bytes `key`'s entry counts against the capacity (0 if absent)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.size
