"""FrontendSupervisor: the engine starts, watches, restarts and stops its front ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
from typing import Any

from .process import FrontendSettings, run_frontend

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5


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
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    async def start(self) -> None:
        """Spawn every front end and wait until each listens."""
        readies = [self._spawn(i) for i in range(self._count)]
        for index, ready in enumerate(readies):
            if not await asyncio.to_thread(ready.wait, READY_TIMEOUT_S):
                raise RuntimeError(f"front end {index} did not start in {READY_TIMEOUT_S:g} s")
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _spawn(self, index: int) -> Any:
        ready = self._context.Event()
        process = self._context.Process(
            target=run_frontend,
            args=(self._settings, index, ready),
            name=f"convoy-frontend-{index}",
        )
        process.start()
        self._processes[index] = process
        return ready

    async def _watch(self) -> None:
        """A front end that dies is restarted; only the calls it held failed."""
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for index, process in enumerate(self._processes):
                if self._stopping or process.is_alive():
                    continue
                log.error(
                    "front end %d (pid %s) exited with %s; restarting it",
                    index,
                    process.pid,
                    process.exitcode,
                )
                self.restarts += 1
                await asyncio.to_thread(self._spawn(index).wait, READY_TIMEOUT_S)

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
