"""The bounded sample buffer that the event loop fills, a few rows per request.

`offer()` runs on the event loop for every answered request, so it does only
O(1) work: a credit counter decides whether this request is sampled (no random
numbers), and a sampled request's first rows are copied into the current window
of each monitored tensor (a preallocated buffer), at most ROW_BUDGET_BYTES of them
a tensor. BYTES strings are kept, not copied, but no config bounds their size, so
the same budget holds: a string that does not fit what is left of it is skipped
and counted, and a window keeps at most `window` x ROW_BUDGET_BYTES of strings
alive. A full window moves to a bounded hand-off queue that the monitor's thread
drains; when that thread falls behind, the oldest full window is dropped and
counted, so memory stays fixed: one filling window per tensor plus max_pending
windows per tensor in the queue.
No statistics here (DESIGN §9).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import TensorSpec
from ..tensors import NUMPY_DTYPES, Array

# Copied (BYTES: kept) per tensor per sampled request, at most; a numeric row always
# (its size is the config's), a string only if it fits.
ROW_BUDGET_BYTES = 64 * 1024
MAX_PENDING_WINDOWS = 2  # full windows per tensor waiting for the thread


@dataclass(frozen=True)
class SampledTensor:
    """A tensor to sample: an input or an output of the model."""

    spec: TensorSpec
    is_output: bool = False


class _Window:
    """One tensor's current window: numeric rows, or BYTES strings flattened."""

    __slots__ = ("buffer", "filled")

    def __init__(self, buffer: Array) -> None:
        self.buffer = buffer
        self.filled = 0


class TensorSampler:
    def __init__(self, tensor: SampledTensor, window: int, rows_per_request: int) -> None:
        self.tensor = tensor
        spec = tensor.spec
        self.is_bytes = spec.datatype == "BYTES"
        self.window = window
        self.skipped = 0  # BYTES: strings over what was left of a request's budget
        if self.is_bytes:
            self._row_shape: tuple[int, ...] = ()
            self._dtype: np.dtype[np.generic] = np.dtype(np.object_)
            self._take = rows_per_request  # strings per request
        else:
            self._row_shape = spec.dims
            self._dtype = NUMPY_DTYPES[spec.datatype]
            row_bytes = self._dtype.itemsize * math.prod(spec.dims)
            self._take = max(1, min(rows_per_request, ROW_BUDGET_BYTES // max(row_bytes, 1)))
        self._current = self._new_window()

    def _new_window(self) -> _Window:
        return _Window(np.empty((self.window, *self._row_shape), dtype=self._dtype))

    def add(self, rows: Array) -> Array | None:
        """Copy a sampled request's first rows in; the window array once it is full."""
        current = self._current
        room = self.window - current.filled
        if self.is_bytes:
            self._add_strings(current, rows.flat[: self._take].tolist(), room)
        else:
            count = min(self._take, room, len(rows))
            current.buffer[current.filled : current.filled + count] = rows[:count]
            current.filled += count
        if current.filled < self.window:
            return None
        # A fresh buffer per window (not per request): the full one now belongs to the thread.
        self._current = self._new_window()
        return current.buffer

    def _add_strings(self, current: _Window, strings: list[Any], room: int) -> None:
        """The first strings of a request (rows_per_request at most are looked at),
        each kept if it fits what is left of the request's byte budget."""
        left = ROW_BUDGET_BYTES
        for item in strings:
            if room == 0:
                break
            size = _string_size(item)
            if size > left:
                self.skipped += 1
                continue
            left -= size
            if isinstance(item, (bytearray, memoryview)):
                item = bytes(item)  # not a view that keeps a larger buffer alive
            current.buffer[current.filled] = item
            current.filled += 1
            room -= 1


def _string_size(item: object) -> int:
    """The bytes a sampled BYTES element keeps alive (str: its characters)."""
    if isinstance(item, memoryview):
        return item.nbytes
    if isinstance(item, (bytes, bytearray, str)):
        return len(item)
    return 0  # not a string (a number): small


class Sampler:
    """Samples requests into bounded windows; the loop offers, the thread takes."""

    def __init__(
        self,
        tensors: list[SampledTensor],
        batched: bool,
        window: int,
        sample_rate: float = 1.0,
        rows_per_request: int = 4,
        max_pending: int = MAX_PENDING_WINDOWS,
    ) -> None:
        self.batched = batched
        self.sample_rate = sample_rate
        self._inputs = [
            TensorSampler(t, window, rows_per_request) for t in tensors if not t.is_output
        ]
        self._outputs = [TensorSampler(t, window, rows_per_request) for t in tensors if t.is_output]
        self._credit = 0.0
        # deque.append and popleft are atomic under the GIL: the loop appends, the thread pops.
        # One bound per tensor: a tensor whose windows fill faster never evicts another's.
        self._full: dict[str, collections.deque[Array]] = {
            t.spec.name: collections.deque(maxlen=max_pending) for t in tensors
        }
        self.offered = 0  # requests seen
        self.sampled = 0  # requests copied from
        self.dropped = 0  # full windows lost because the thread fell behind

    def offer(self, inputs: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        """Called on the event loop once per answered request; tensors it lacks (an
        optional input, an output the client did not ask for) are skipped."""
        self.offered += 1
        self._credit += self.sample_rate
        if self._credit < 1.0:
            return
        self._credit -= 1.0
        self.sampled += 1
        for samplers, tensors in ((self._inputs, inputs), (self._outputs, outputs)):
            for sampler in samplers:
                array = tensors.get(sampler.tensor.spec.name)
                if array is None:
                    continue
                full = sampler.add(array if self.batched else array[np.newaxis])
                if full is not None:
                    pending = self._full[sampler.tensor.spec.name]
                    if len(pending) == pending.maxlen:
                        self.dropped += 1
                    pending.append(full)

    def take(self) -> list[tuple[str, Array]]:
        """Full windows, oldest first per tensor; called from the monitor's thread."""
        windows = []
        for name, pending in self._full.items():
            while True:
                try:
                    windows.append((name, pending.popleft()))
                except IndexError:
                    break
        return windows

    @property
    def buffered_windows(self) -> int:
        return sum(len(pending) for pending in self._full.values())

    @property
    def strings_skipped(self) -> dict[str, int]:
        """Per BYTES tensor: strings left out for the byte budget."""
        samplers = (*self._inputs, *self._outputs)
        return {s.tensor.spec.name: s.skipped for s in samplers if s.is_bytes}
