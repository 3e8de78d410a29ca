"""Request coalescing: identical requests that arrive while the first is computing
wait for that one result instead of computing again (Triton's cache has no such
thing: a burst of identical misses all run the model).

Each follower gets a future of its own, so a follower that is cancelled (its
client went away) cancels only that future, never the leader's computation nor
the other followers. Every future is answered exactly once: with the result, the
leader's error, or LeaderGone when the leader stopped for reasons of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LeaderGone(Exception):
    """The computation a follower waited for was abandoned (its client cancelled, its
    own deadline passed): the follower should look up and lead or follow again."""


class Coalescer(Generic[K, V]):
    def __init__(self) -> None:
        self._followers: dict[K, list[asyncio.Future[V]]] = {}

    def __len__(self) -> int:
        """Computations in flight."""
        return len(self._followers)

    def in_flight(self, key: K) -> bool:
        return key in self._followers

    def join(self, key: K) -> asyncio.Future[V] | None:
        """None: nothing is computing `key`, and the caller now leads (it must end with
        resolve, reject or abandon). Else a future answered when the leader ends."""
        followers = self._followers.get(key)
        if followers is None:
            self._followers[key] = []
            return None
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        followers.append(future)
        return future

    def resolve(self, key: K, value: V) -> int:
        """Answer every follower of `key` with `value`; how many were still waiting."""
        answered = 0
        for future in self._followers.pop(key, ()):
            if not future.done():
                future.set_result(value)
                answered += 1
        return answered

    def reject(self, key: K, error: BaseException) -> int:
        """Fail every follower of `key` with the leader's `error`."""
        return self._fail(key, error)

    def abandon(self, key: K) -> int:
        """The leader stopped without an answer that belongs to the others."""
        return self._fail(key, LeaderGone())

    def _fail(self, key: K, error: BaseException) -> int:
        answered = 0
        for future in self._followers.pop(key, ()):
            if not future.done():
                future.set_exception(error)
                answered += 1
        return answered
