"""FrontendSupervisor: the engine starts, watches, restarts and stops its front ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any

from .process import FrontendSettings, run_frontend

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5
READY_POLL_S = 0.05


@dataclass
class RestartBackoff:
    """How long a dead front end's slot waits before it is restarted: at once after one
    that served a while, and after the first that dies young; then a delay doubling
    from base_s to cap_s while its successors keep dying young (a front end that
    cannot start must not restart in a tight loop)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    settled_s: float = 10.0  # a front end that lived this long resets the delay
    failures: int = 0

    def delay(self, lived_s: float) -> float:
        if lived_s >= self.settled_s:
            self.failures = 0
            return 0.0
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return min(self.cap_s, self.base_s * 2.0 ** (self.failures - 2))


def default_frontends(cores: int | None = None) -> int:
    """One front end per 4 cores, at least 1 (so 1 on a 2-core machine: no IPC hop) and
    at most 8: the rest of the cores are the engine's (its loop, instance threads,
    intra-op threads)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(8, cores // 4))


class FrontendSupervisor:
    def __init__(self, settings: FrontendSettings, count: int) -> None:
        self._settings = settings
        self._count = count
        self._context = mp.get_context("spawn")  # never fork a process that runs gRPC
        self._processes: list[Any] = [None] * count
        self._started: list[float] = [0.0] * count  # loop time of each slot's spawn
        # Each slot's readiness event, held: a child unpickles it after its start, and a
        # collected event has unlinked its semaphore by then.
        self._readies: list[Any] = [None] * count
        self._backoff = [RestartBackoff() for _ in range(count)]
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    async def start(self) -> None:
        """Spawn every front end and wait until each listens."""
        for index in range(self._count):
            self._spawn(index)
        for index in range(self._count):
            await self._until_ready(index)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _until_ready(self, index: int) -> None:
        """Polled, not waited on in a thread: a front end that dies while starting is
        seen at once, and a stop is never held up by a thread still waiting."""
        process, ready = self._processes[index], self._readies[index]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while not ready.is_set():
            if not process.is_alive():
                raise RuntimeError(
                    f"front end {index} exited with {process.exitcode} before it listened"
                )
            if loop.time() >= deadline:
                raise RuntimeError(f"front end {index} did not start in {READY_TIMEOUT_S:g} s")
            await asyncio.sleep(READY_POLL_S)

    def _spawn(self, index: int) -> None:
        ready = self._context.Event()
        process = self._context.Process(
            target=run_frontend,
            args=(self._settings, index, ready),
            name=f"convoy-frontend-{index}",
        )
        process.start()
        self._processes[index] = process
        self._readies[index] = ready
        self._started[index] = asyncio.get_running_loop().time()

    async def _watch(self) -> None:
        """A front end that dies is restarted; only the calls it held failed. Each slot
        on its own: one that keeps dying waits out its back-off without holding up
        the restart of another."""
        loop = asyncio.get_running_loop()
        due: dict[int, float] = {}  # dead slots: when each restarts
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = loop.time()
            for index, process in enumerate(self._processes):
                if self._stopping:
                    return
                if index not in due:
                    if process.is_alive():
                        continue
                    delay = self._backoff[index].delay(now - self._started[index])
                    log.error(
                        "front end %d (pid %s) exited with %s; restarting it in %.1f s",
                        index,
                        process.pid,
                        process.exitcode,
                        delay,
                    )
                    due[index] = now + delay
                if now >= due[index]:
                    del due[index]
                    self.restarts += 1
                    self._spawn(index)  # ready or not, the next round sees if it died

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p is not None]

    @property
    def pids_by_index(self) -> dict[int, int]:
        """Each slot's current process (a restarted front end takes its slot over)."""
        return {i: p.pid for i, p in enumerate(self._processes) if p is not None}

    async def stop(self, grace_period_s: float) -> None:
        """SIGTERM every front end (each drains its calls within the grace period)."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for process in self._processes:
            if process is not None and process.is_alive():
                process.terminate()
        for process in self._processes:
            if process is None:
                continue
            await asyncio.to_thread(process.join, grace_period_s + 5)
            if process.is_alive():
                log.error("front end pid %d did not stop; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5)
