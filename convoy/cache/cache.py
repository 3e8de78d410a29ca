"""The response cache as the serving path sees it: Triton's switches and statistics,
an LRU bounded by bytes, and coalescing of identical requests in flight.

Integration, per request of a model whose config has `response_cache { enable: true }`
on a server started with `--cache-config local,size=BYTES`, after decode and before
the queue:

    key = request_key(model, version, req.inputs, req.outputs, req.classification)
    answer = await cache.get_or_compute(key, lambda: served_model.infer(req))
    # ... encode_response(..., answer.result) exactly as for a computed answer

A hit never reaches the queue. The cache holds InferResult (the arrays the encoder
reads), so a cached answer encodes to the same bytes as a computed one.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..batching.request import InferResult
from ..config import CacheConfig
from ..errors import Cancelled, DeadlineExceeded, InvalidInput
from ..statistics import Duration
from ..tensors import Array, Ranked
from .coalesce import Coalescer, LeaderGone
from .key import CacheKey
from .lru import ByteLRU

# The per-request switch. Triton has none (its cache is per model only); the name
# mirrors config.pbtxt's `response_cache` so the two read as one feature.
BYPASS_PARAMETER = "response_cache"

# Errors that belong to the leader's own request rather than to the computation:
# its followers ask again (one of them leads) instead of failing with them.
_LEADER_ONLY_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    Cancelled,
    DeadlineExceeded,
)

_ARRAY_HEADER_BYTES = sys.getsizeof(np.empty(0))  # the ndarray object without its data
_RANKED_BYTES = sys.getsizeof(Ranked(np.empty(0), np.empty(0)))
_RESULT_BYTES = sys.getsizeof(InferResult({}))
_SIZE_SUFFIXES = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


class CacheConfigError(ValueError):
    """`--cache-config` text that cannot be read; the message says what to write."""


def parse_cache_config(values: Sequence[str]) -> CacheConfig:
    """Read `--cache-config` values as Triton does: each is `<cache>,<key>=<value>[,...]`,
    the flag may repeat (one key each), and every value names the same cache. Only
    `local` with `size` exists; size is bytes, or KiB/MiB/GiB with that suffix."""
    if not values:
        raise CacheConfigError("--cache-config: expected local,size=BYTES")
    implementation: str | None = None
    settings: dict[str, str] = {}
    for value in values:
        name, *pairs = (part.strip() for part in value.split(","))
        if name != "local":
            raise CacheConfigError(
                f"--cache-config {value!r}: unknown cache '{name}'; Convoy has 'local' "
                "(e.g. --cache-config local,size=1048576)"
            )
        if implementation is not None and name != implementation:
            raise CacheConfigError(f"--cache-config names two caches: {implementation}, {name}")
        implementation = name
        if not pairs:
            raise CacheConfigError(f"--cache-config {value!r}: expected {name},size=BYTES")
        for pair in pairs:
            key, sep, setting = pair.partition("=")
            if not sep or not key or not setting:
                raise CacheConfigError(f"--cache-config {value!r}: '{pair}' is not key=value")
            if key != "size":
                raise CacheConfigError(
                    f"--cache-config {value!r}: unknown key '{key}' for the local cache; "
                    "it takes size=BYTES"
                )
            if key in settings:
                raise CacheConfigError(f"--cache-config: '{key}' is given twice")
            settings[key] = setting
    if "size" not in settings:
        raise CacheConfigError("--cache-config: the local cache needs size=BYTES")
    return CacheConfig(size_bytes=_size_bytes(settings["size"]))


def _size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB)?", text)
    if match is None:
        raise CacheConfigError(
            f"--cache-config: size={text!r} is not a byte count (e.g. 1048576 or 256MiB)"
        )
    size = int(match[1]) * _SIZE_SUFFIXES[match[2] or ""]
    if size <= 0:
        raise CacheConfigError(
            "--cache-config: size must be > 0; leave --cache-config out to turn the cache off"
        )
    return size


def request_uses_cache(choice: str | None, value: object) -> bool:
    """The request parameter `response_cache`: absent or true uses the cache; false
    neither reads nor writes it (nor joins a computation in flight). `choice` is the
    InferParameter's oneof field name, for the error."""
    if choice is None:
        return True
    if choice != "bool_param" or not isinstance(value, bool):
        raise InvalidInput(f"parameter '{BYPASS_PARAMETER}' must be a bool, got {choice}")
    return value


@dataclass
class CacheStats:
    """One model version's share of the cache. `hit` and `miss` are Triton's
    InferStatistics.cache_hit / cache_miss: a hit's ns is the lookup, a miss's the
    lookup plus storing the computed result. A follower of a coalesced computation
    counts as a hit (it ran nothing) and as coalesced."""

    hit: Duration = field(default_factory=Duration)
    miss: Duration = field(default_factory=Duration)
    coalesced: int = 0
    evictions: int = 0
    entries: int = 0
    bytes_used: int = 0

    @property
    def hits(self) -> int:
        return self.hit.count

    @property
    def misses(self) -> int:
        return self.miss.count


@dataclass(frozen=True)
class CacheAnswer:
    """What get_or_compute answered with, and how: `computed` ran the model (and is
    counted by the queue as usual); `hit` and `coalesced` did not, so the caller
    records them as successes itself (Triton counts cache hits in success)."""

    result: InferResult
    source: Literal["hit", "coalesced", "computed"]


def result_bytes(result: InferResult) -> int:
    """What holding `result` costs: array data, array objects, BYTES elements."""
    total = _RESULT_BYTES + sys.getsizeof(result.outputs) + sys.getsizeof(result.ranked)
    for array in result.outputs.values():
        total += _array_bytes(array)
    for ranked in result.ranked.values():
        total += _RANKED_BYTES + _array_bytes(ranked.values) + _array_bytes(ranked.indices)
        if ranked.text is not None:
            total += _array_bytes(ranked.text)
    if result.added_inputs:
        total += sys.getsizeof(result.added_inputs)
        total += sum(_array_bytes(array) for array in result.added_inputs.values())
    return total


def _array_bytes(array: Array) -> int:
    total = _ARRAY_HEADER_BYTES + array.nbytes  # nbytes of an object array: its pointers
    if array.dtype == np.object_:
        total += sum(sys.getsizeof(item) for item in array.reshape(-1))
    return total


def _owned(array: Array) -> Array:
    """A read-only array that owns its data: a view would keep its whole batch alive
    (uncounted), and read-only turns a stray write into an error, not a wrong answer."""
    if array.base is not None or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
    array.flags.writeable = False
    return array


def _compact(result: InferResult) -> InferResult:
    ranked = {
        name: Ranked(
            _owned(r.values), _owned(r.indices), None if r.text is None else _owned(r.text)
        )
        for name, r in result.ranked.items()
    }
    # Looked-up features kept: a hit is captured with what the model saw for the answer.
    added = {name: _owned(a) for name, a in result.added_inputs.items()}
    return InferResult({name: _owned(a) for name, a in result.outputs.items()}, ranked, added)


class ResponseCache:
    """Event-loop only. One per server, shared by every model that enables it."""

    def __init__(self, config: CacheConfig, clock: Callable[[], int] = time.perf_counter_ns):
        self.config = config
        self._clock = clock
        self._lru: ByteLRU[CacheKey, InferResult] = ByteLRU(config.size_bytes, self._evicted)
        # Keyed by (key, generation): after a reload a request never joins a computation
        # the old model started.
        self._coalescer: Coalescer[tuple[CacheKey, int], InferResult] = Coalescer()
        self._stats: dict[tuple[str, int], CacheStats] = {}
        # Bumped when a model's entries are cleared, so a computation begun before a
        # reload cannot store its (old model's) result after it.
        self._generation: dict[str, int] = {}
        self._leaders: set[tuple[CacheKey, int]] = set()  # (key, generation) computing
        self._missed: tuple[CacheKey, int] | None = None  # the last missed lookup's ns

    @property
    def capacity_bytes(self) -> int:
        return self._lru.capacity_bytes

    @property
    def bytes_used(self) -> int:
        return self._lru.bytes_used

    @property
    def entries(self) -> int:
        return len(self._lru)

    @property
    def in_flight(self) -> int:
        return len(self._coalescer)

    def stats(self, model: str, version: int) -> CacheStats:
        """This version's counters (zeros if it never used the cache)."""
        return self._stats.get((model, version)) or CacheStats()

    def all_stats(self) -> dict[tuple[str, int], CacheStats]:
        return dict(self._stats)

    def _for(self, key: CacheKey) -> CacheStats:
        stats = self._stats.get((key.model, key.version))
        if stats is None:
            stats = self._stats[(key.model, key.version)] = CacheStats()
        return stats

    # -- the request path ---------------------------------------------------------

    def lookup(self, key: CacheKey) -> InferResult | None:
        """The cached result (a hit, counted), else None: then call begin(key) at once,
        with no await between, or an identical request may compute alongside."""
        start = self._clock()
        result = self._lru.get(key)
        elapsed = self._clock() - start
        if result is None:
            self._missed = (key, elapsed)
            return None
        self._for(key).hit.add(elapsed)
        return result

    def begin(self, key: CacheKey) -> asyncio.Future[InferResult] | None:
        """After a missed lookup. None: the caller leads, computes, and must end with
        complete, fail or abandon (a miss, counted). Else a future of the leader's
        answer (a hit and coalesced, counted once it succeeds); cancelling it affects
        no one else."""
        lookup_ns = 0
        if self._missed is not None and self._missed[0] == key:
            lookup_ns = self._missed[1]
        self._missed = None
        token = (key, self._generation.get(key.model, 0))
        follower = self._coalescer.join(token)
        if follower is None:
            self._for(key).miss.add(lookup_ns)
            self._leaders.add(token)
        else:
            follower.add_done_callback(lambda done: self._followed(key, lookup_ns, done))
        return follower

    def _followed(self, key: CacheKey, lookup_ns: int, done: asyncio.Future[InferResult]) -> None:
        # Counted once answered: a follower that fails with its leader, gives up or asks
        # again (LeaderGone) was not answered from the cache.
        if not done.cancelled() and done.exception() is None:
            stats = self._for(key)
            stats.hit.add(lookup_ns)
            stats.coalesced += 1

    def complete(
        self, key: CacheKey, result: InferResult, generation: int | None = None
    ) -> InferResult:
        """Store the leader's result and answer its followers; returns the stored
        (compacted, read-only) copy. `generation`: the model's when the leader began
        (default: now); a result begun before a reload is answered, never stored."""
        start = self._clock()
        token = (key, self._generation.get(key.model, 0) if generation is None else generation)
        began = token in self._leaders
        self._leaders.discard(token)
        try:
            stored = _compact(result)
        except BaseException:
            self._coalescer.resolve(token, result)  # every follower is still answered once
            raise
        if began and token[1] == self._generation.get(key.model, 0):
            size = result_bytes(stored)
            stats = self._for(key)
            previous = self._lru.size_of(key)
            if previous:
                self._lru.remove(key)
                stats.entries -= 1
                stats.bytes_used -= previous
            if self._lru.put(key, stored, size):
                stats.entries += 1
                stats.bytes_used += self._lru.size_of(key)
        self._for(key).miss.add(self._clock() - start, count=0)
        self._coalescer.resolve(token, stored)
        return stored

    def fail(self, key: CacheKey, error: BaseException, generation: int | None = None) -> None:
        """The computation failed: nothing is stored, the followers get `error`."""
        token = self._token(key, generation)
        self._leaders.discard(token)
        self._coalescer.reject(token, error)

    def abandon(self, key: CacheKey, generation: int | None = None) -> None:
        """The leader stopped for reasons of its own: followers ask again."""
        token = self._token(key, generation)
        self._leaders.discard(token)
        self._coalescer.abandon(token)

    def _token(self, key: CacheKey, generation: int | None) -> tuple[CacheKey, int]:
        return (key, self._generation.get(key.model, 0) if generation is None else generation)

    async def get_or_compute(
        self,
        key: CacheKey,
        compute: Callable[[], Awaitable[InferResult]],
        wait_s: float | None = None,
    ) -> CacheAnswer:
        """A hit, or the result of an identical computation in flight, or `compute()`'s
        (stored for the next request). Errors of the computation reach every waiter
        and are not stored; the leader's cancellation or deadline is its own. `wait_s`
        bounds a follower's wait (the request's own deadline; a leader's deadline is
        enforced by the queue): past it, DeadlineExceeded."""
        while True:
            hit = self.lookup(key)
            if hit is not None:
                return CacheAnswer(hit, "hit")
            generation = self._generation.get(key.model, 0)  # what begin() keys on
            follower = self.begin(key)
            if follower is None:
                try:
                    result = await compute()
                except _LEADER_ONLY_ERRORS:
                    self.abandon(key, generation)
                    raise
                except BaseException as exc:
                    self.fail(key, exc, generation)
                    raise
                self.complete(key, result, generation)
                return CacheAnswer(result, "computed")
            try:
                return CacheAnswer(await asyncio.wait_for(follower, wait_s), "coalesced")
            except LeaderGone:
                continue
            except TimeoutError:
                raise DeadlineExceeded(
                    "deadline passed while waiting for an identical request's answer"
                ) from None

    # -- lifecycle ----------------------------------------------------------------

    def clear_model(self, model: str, version: int | None = None) -> int:
        """Drop `model`'s entries (one version's, or all): on reload and unload. Counters
        stay, as Prometheus counters must; the bytes and entries go to zero. Returns
        the number of entries dropped."""
        self._generation[model] = self._generation.get(model, 0) + 1
        doomed = [k for k in self._lru.keys() if k.model == model and version in (None, k.version)]
        for key in doomed:
            freed = self._lru.remove(key)
            stats = self._for(key)
            stats.entries -= 1
            stats.bytes_used -= freed
        return len(doomed)

    def _evicted(self, key: CacheKey, size: int) -> None:
        stats = self._for(key)
        stats.evictions += 1
        stats.entries -= 1
        stats.bytes_used -= size
