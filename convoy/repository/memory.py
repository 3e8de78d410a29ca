"""What the models hold in memory: the process's resident memory and each GPU's, read
before and after a load (DESIGN §14: measured, not declared).

A probe reads the whole process (or the whole GPU), so a load's delta includes whatever
else grew meanwhile; on-demand loads run one at a time to keep that noise small.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from ..procstat import process_usage

log = logging.getLogger(__name__)

HOST = "cpu"  # the device label of host (resident) memory


class MemoryProbe(Protocol):
    def used(self) -> dict[str, int]:
        """Bytes in use per device: `cpu` the process's resident memory, `cuda:N`
        that GPU's (where the probe reads GPUs)."""
        ...

    def release(self) -> None:
        """After an unload: hand freed heap pages back to the OS, so resident memory
        shows the unload."""
        ...


class ProcessMemory:
    """This process's resident memory from /proc; with `gpus`, every GPU's used memory
    from torch.cuda.mem_get_info (device-wide: ONNX Runtime's CUDA allocations too, and
    other processes' on a shared GPU)."""

    def __init__(self, gpus: bool = False, proc: Path = Path("/proc")) -> None:
        self._gpus = gpus
        self._proc = proc
        self._trim = _malloc_trim()

    def used(self) -> dict[str, int]:
        usage = process_usage(os.getpid(), proc=self._proc)
        used = {HOST: 0 if usage is None else usage[1]}
        if self._gpus:
            used.update(_gpu_used())
        return used

    def release(self) -> None:
        if self._trim is not None:
            self._trim(0)


class PeakSampler:
    """The most each device used while a load ran, sampled every `period_s` on a thread
    of its own: a runtime's transient copies (a parsed model file beside the session
    built from it) are gone by the time the load returns, yet they were resident."""

    def __init__(self, probe: MemoryProbe, period_s: float = 0.005) -> None:
        self._probe = probe
        self._period = period_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-peak", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def _sample(self) -> None:
        for device, used in self._probe.used().items():
            self.peak[device] = max(self.peak.get(device, 0), used)


def growth(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per device, what a load added (never below zero: memory freed meanwhile by
    something else is not the model's)."""
    return {device: max(0, after[device] - before.get(device, 0)) for device in after}


def files_size(path: Path) -> int:
    """Bytes of the regular files under `path`, links followed: the first estimate of
    a model never loaded (its weights are at least that once in memory)."""
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size
        except OSError:
            continue
    return total


def _gpu_used() -> dict[str, int]:
    import torch  # only where a GPU budget is set: `convoy serve` does not import it

    used: dict[str, int] = {}
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        used[f"cuda:{index}"] = int(total - free)
    return used


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim: freed arenas go back to the OS at once instead of staying
    resident (an evicted model's memory would otherwise still count against the
    budget's measure). None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
