"""Arena: where the event loop copies a captured tensor's values, one model tensor's rows
after another in large reused chunks, so that the writer's thread finds a column's values
already side by side (rows.table hands a chunk's run to pyarrow as it is, no join).

Why copy at all, when a gRPC-decoded input lies in `bytes` that never change: holding
those bytes until the writer converts them made every next request's 48 KiB land on
fresh pages, 5.7 minor page faults per image request on the loop against 0.29 with
capture off (perf: PyBytes_FromStringAndSize from the protobuf decoder), about 50 µs of
the loop's CPU per request. A copy into an already-faulted chunk costs about 4 µs, and the
request's memory is reused at once, as with capture off. Small values in `bytes` (under
SMALL_BYTES, tiny's 64) are kept as they are instead (recorder._in_bytes): their memory
comes from the interpreter's small-object pools, not fresh pages.

A chunk is reused only once nothing points into it (its rows written and their Arrow
tables gone: checked by reference count), so a row's view never changes under it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

CHUNK_BYTES = 4 << 20  # a chunk: about 85 image rows; a value larger is copied on its own
# Values smaller than this are copied on their own: a plain copy costs less than the
# arena's slicing (tiny's 64 bytes), and their join on the writer's thread is cheap.
SMALL_BYTES = 4096


def _references(chunks: list[np.ndarray[Any, Any]], i: int) -> int:
    return sys.getrefcount(chunks[i])


# What _references counts for a chunk nothing else points into (the list's reference,
# and the call's own, as this interpreter counts them): more means a row's view or an
# Arrow array still points into it.
_UNREFERENCED = _references([np.empty(0, np.uint8)], 0)


class Arena:
    """The chunks of one tensor of one model config (one dtype, so the values lie side by
    side with no padding). Used on the event loop only; the writer's thread only drops
    references, which the loop reads when it looks for a spare chunk."""

    __slots__ = (
        "_chunk", "_chunk_bytes", "_dtype", "_filled", "_max_spare", "_small", "_spare", "rolled",
    )  # fmt: skip

    def __init__(
        self,
        dtype: np.dtype[Any],
        chunk_bytes: int = CHUNK_BYTES,
        max_bytes: int = 64 << 20,
        small_bytes: int = SMALL_BYTES,
    ) -> None:
        self._dtype = dtype
        self._small = small_bytes
        self._chunk_bytes = chunk_bytes - chunk_bytes % dtype.itemsize
        self._chunk: np.ndarray[Any, Any] | None = None
        self._filled = 0  # bytes of the current chunk handed out
        self._spare: list[np.ndarray[Any, Any]] = []  # chunks handed out before this one
        # Beyond this many chunks still in use, a new one is not kept for reuse: the
        # writer's budget bounds what is in flight, this what the arena holds after.
        self._max_spare = max(2, max_bytes // self._chunk_bytes + 1)
        # Set when a copy began a new chunk; the recorder reads and clears it, and the
        # row starts a new segment of its model's rows (rows.PendingRows.breaks).
        self.rolled = False

    def copy(self, value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The value's copy: in the current chunk (a view of it) where it is large and
        fits, else on its own."""
        size = value.nbytes
        if size < self._small or size > self._chunk_bytes or value.dtype != self._dtype:
            return value.copy()
        chunk = self._chunk
        if chunk is None or self._filled + size > self._chunk_bytes:
            chunk = self._next_chunk()
        start = self._filled
        self._filled = start + size
        kept = chunk[start : start + size].view(self._dtype).reshape(value.shape)
        np.copyto(kept, value)
        return kept

    def _next_chunk(self) -> np.ndarray[Any, Any]:
        """A spare chunk nothing points into any more, else a new one."""
        if self._chunk is not None:
            self._spare.append(self._chunk)
        chunk = None
        for i in range(len(self._spare)):
            if _references(self._spare, i) <= _UNREFERENCED:
                chunk = self._spare.pop(i)
                break
        if chunk is None:
            chunk = np.empty(self._chunk_bytes, np.uint8)
            if len(self._spare) >= self._max_spare:  # still in use: let them go when done
                self._spare.pop(0)
        self._chunk, self._filled = chunk, 0
        self.rolled = True
        return chunk


def joined(values: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any] | None:
    """The values as one flat array without a copy where each lies right after the one
    before it in one arena chunk (a segment's rows: PendingRows.breaks); else None."""
    first = values[0]
    base = first.base
    if not isinstance(base, np.ndarray) or base.dtype != np.uint8 or base.ndim != 1:
        return None
    origin = base.__array_interface__["data"][0]
    start = end = first.__array_interface__["data"][0]
    for value in values:  # every one: another version's rows may share the chunk
        if value.base is not base or not value.flags.c_contiguous:
            return None
        if value.__array_interface__["data"][0] != end:
            return None
        end += value.nbytes
    flat: np.ndarray[Any, Any] = base[start - origin : end - origin].view(first.dtype)
    return flat
