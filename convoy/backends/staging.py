"""Host memory on the way to and from a GPU backend (DESIGN §3: one copy).

Up: the batcher concatenates the requests of a batch straight into an
instance's staging buffer, which is page-locked on a GPU instance, so the copy
to the device is a true asynchronous DMA with no second, hidden copy by the
driver. A backend only ever runs one batch at a time and waits for its copies
before it returns, so one buffer per input is enough: it is never rewritten
while a copy from it is in flight.

Down: bring_back() ranks on the device, copies into fresh pinned memory and
waits for this batch's CUDA event on the instance's thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tensors import Ranked, Ranking
from .base import Array
from .ranking import TopK, rank_on_device


class StagingBuffers:
    """One growable byte buffer per input name; views of it are handed out shaped."""

    def __init__(self, pinned: bool) -> None:
        self._pinned = pinned
        self._buffers: dict[str, Any] = {}  # name -> torch uint8 tensor (pinned on a GPU host)

    def reserve(self, name: str, nbytes: int) -> Any:
        """This input's buffer, at least `nbytes` long (allocated up front where the
        largest batch is known, so no batch pays for pinning memory)."""
        import torch

        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            # Grow geometrically: a batch size seen once is likely to be seen again.
            size = max(nbytes, 2 * buffer.numel() if buffer is not None else 0, 4096)
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self._pinned)
            self._buffers[name] = buffer
        return buffer

    def view(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
        """A writable array of `shape` and `dtype` over this input's buffer."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        flat: Array = self.reserve(name, nbytes).numpy()[:nbytes]
        return flat.view(dtype).reshape(shape)

    def holds(self, array: Array) -> bool:
        """Whether `array` lies in one of these buffers (then it is already staged)."""
        return any(np.may_share_memory(array, b.numpy()) for b in self._buffers.values())

    def upload(self, array: Array, device: Any) -> Any:
        """Enqueue the copy of `array` to `device` on the current stream, without
        blocking: straight from a staging buffer, else through pinned memory from
        torch's caching host allocator."""
        import torch

        host = torch.from_numpy(np.ascontiguousarray(array))
        if not self.holds(array):
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    def clear(self) -> None:
        self._buffers.clear()


def to_pinned_host(tensor: Any) -> Any:
    """Enqueue, on the current stream, a copy of a device tensor into fresh pinned
    host memory (floats as float32). It comes from torch's caching host allocator,
    and the numpy view handed on keeps the block alive until the reply is sent."""
    import torch

    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.float()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    return pinned


def bring_back(
    outputs: Mapping[str, Any],
    output_names: Sequence[str],
    rankings: Mapping[str, Ranking],
    topk: TopK,
    stream: Any,
    blocking: bool,
) -> tuple[dict[str, Array], dict[str, Ranked]]:
    """Rank on the device, enqueue the copies back on `stream`, then wait for them on
    a CUDA event recorded after the last one: this batch's work only, on the calling
    instance's thread. A blocking event sleeps; a spinning one (busy_wait_events)
    answers sooner for a core kept busy."""
    import torch

    on_device = rank_on_device(outputs, rankings, topk)
    host = {name: to_pinned_host(outputs[name]) for name in output_names}
    host_ranked = {n: (to_pinned_host(v), to_pinned_host(i)) for n, (v, i) in on_device.items()}
    done = torch.cuda.Event(blocking=blocking)
    done.record(stream)
    done.synchronize()
    ranked = {n: Ranked(v.numpy(), i.numpy()) for n, (v, i) in host_ranked.items()}
    return {name: tensor.numpy() for name, tensor in host.items()}, ranked
