"""DeviceHealth: the GPUs this process may no longer compute on.

An unrecoverable CUDA error (illegal address, device-side assert) poisons the
process's CUDA context on that device: every later call there fails too. Such a
device is failed for good, for every model, until the process restarts; the
circuit breaker's probing is for faults a device recovers from (out of memory).
One object per server, shared by every model's instance pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class DeviceHealth:
    def __init__(self) -> None:
        self.failed: dict[str, str] = {}  # device -> the error that failed it
        self._listeners: list[Callable[[], None]] = []

    def is_failed(self, device: str) -> bool:
        return device in self.failed

    def mark_failed(self, device: str, reason: str) -> None:
        if device in self.failed:
            return
        self.failed[device] = reason
        log.critical(
            "%s failed for good (%s): no model computes on it until the server restarts",
            device,
            reason,
        )
        for listener in list(self._listeners):
            listener()

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
