"""The response cache: Triton's `response_cache` switch and `--cache-config`, an LRU
bounded by bytes, and coalescing of identical requests in flight (docs/cache.md)."""

from __future__ import annotations

from ..config import CacheConfig
from .cache import (
    BYPASS_PARAMETER,
    CacheAnswer,
    CacheConfigError,
    CacheStats,
    ResponseCache,
    parse_cache_config,
    request_uses_cache,
    result_bytes,
)
from .coalesce import Coalescer, LeaderGone
from .key import CacheKey, request_key
from .lru import ByteLRU

__all__ = [
    "BYPASS_PARAMETER",
    "ByteLRU",
    "CacheAnswer",
    "CacheConfig",
    "CacheConfigError",
    "CacheKey",
    "CacheStats",
    "Coalescer",
    "LeaderGone",
    "ResponseCache",
    "parse_cache_config",
    "request_key",
    "request_uses_cache",
    "result_bytes",
]
