"""--repository-poll-secs: Triton's poll mode.

Every interval the repository directory is scanned off the event loop; a model
whose version directories, config.pbtxt or rollout.json changed, or that is new,
is loaded again (through the server's load path, so a declared rollout starts);
a model whose directory disappeared is unloaded. The task is started and stopped
by the server.

A load that fails (a version directory caught half-copied, a model file still
being written) is tried again: at once on a poll that finds the model's files
changed (their names, sizes and mtimes), otherwise after a back-off that doubles
from the poll interval up to RETRY_CAP_S. Each failure is logged at WARNING with
the model, the version and the error, and counted in
convoy_model_load_failures_total. The schedule is a plain object (RetrySchedule)
driven by an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..batching.queue import Clock
from ..config import CONFIG_FILENAME
from ..errors import ConvoyError
from .manager import ModelRepository

log = logging.getLogger(__name__)

# model -> (version directories, config.pbtxt mtime, rollout.json mtime)
Snapshot = dict[str, tuple[tuple[str, ...], int, int]]
# Every file under a model directory: (relative path, size, mtime in ns).
Signature = tuple[tuple[str, int, int], ...]

# The longest wait between two tries of a model that keeps failing with its files
# unchanged (a poll interval longer than this is the wait instead).
RETRY_CAP_S = 300.0


def scan(repository: ModelRepository) -> Snapshot:
    """Blocking: what the repository holds now."""
    snapshot: Snapshot = {}
    for name in repository.on_disk():
        model_dir = repository.root / name
        try:
            versions = tuple(sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()))
            snapshot[name] = (versions, _mtime(model_dir / CONFIG_FILENAME),
                              _mtime(model_dir / "rollout.json"))  # fmt: skip
        except OSError:
            continue  # removed while scanning: the next poll sees it gone
    return snapshot


def signature(model_dir: Path) -> Signature:
    """Blocking: the files under a model directory with their sizes and mtimes, which
    change while a copy is in progress. Hidden entries (convoy optimize's staging
    directory, editors' swap files) are left out: they are not what is loaded."""
    files: list[tuple[str, int, int]] = []
    for folder, dirs, names in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue  # removed while walking: a later signature differs anyway
            files.append((os.path.relpath(path, model_dir), stat.st_size, stat.st_mtime_ns))
    return tuple(files)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class Retry:
    """A model whose last load failed: tried again once the clock reaches due_ns, or
    as soon as its files differ from `files` (what they were when it was tried)."""

    attempts: int
    delay_ns: int  # how long after the failure due_ns is
    due_ns: int
    files: Signature


class RetrySchedule:
    """When to try a failed load again: the first retry one poll interval after the
    failure, each next one twice as long after, up to the cap; a model whose files
    changed is due at once."""

    def __init__(
        self, interval_s: float, cap_s: float = RETRY_CAP_S, clock: Clock = time.monotonic_ns
    ) -> None:
        self._interval_ns = int(interval_s * 1e9)
        self._cap_ns = max(self._interval_ns, int(cap_s * 1e9))
        self._clock = clock
        self._pending: dict[str, Retry] = {}

    def failed(self, name: str, files: Signature) -> Retry:
        """Record a failed try of `name` whose files were `files` when it was tried."""
        previous = self._pending.get(name)
        attempts = 1 if previous is None else previous.attempts + 1
        delay_ns = min(self._cap_ns, self._interval_ns << min(attempts - 1, 32))
        retry = Retry(attempts, delay_ns, self._clock() + delay_ns, files)
        self._pending[name] = retry
        return retry

    def forget(self, name: str) -> None:
        """Loaded (or gone): no more retries."""
        self._pending.pop(name, None)

    def pending(self) -> list[str]:
        return sorted(self._pending)

    def get(self, name: str) -> Retry | None:
        return self._pending.get(name)

    def due(self, name: str, files: Signature) -> bool:
        retry = self._pending.get(name)
        if retry is None:
            return False
        return files != retry.files or self._clock() >= retry.due_ns


class RepositoryPoller:
    def __init__(
        self,
        repository: ModelRepository,
        load: Callable[[str], Awaitable[None]],
        interval_s: float,
        clock: Clock = time.monotonic_ns,
        retry_cap_s: float = RETRY_CAP_S,
    ) -> None:
        self._repo = repository
        self._load = load
        self._interval = interval_s
        self._seen: Snapshot = {}
        self.retries = RetrySchedule(interval_s, retry_cap_s, clock)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take the current state as seen (models just loaded), then poll. A model whose
        start-up load failed is tried again like one that failed on a poll."""
        self._seen = await asyncio.to_thread(scan, self._repo)
        failed = [name for name in self._seen if self._repo.load_failure(name) is not None]
        for name, files in (await asyncio.to_thread(self._signatures, failed)).items():
            self.retries.failed(name, files)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        now = await asyncio.to_thread(scan, self._repo)
        for name in self.retries.pending():
            loaded = self._repo.load_failure(name) is None and self._repo.loaded_versions(name)
            if name not in now or loaded:
                self.retries.forget(name)  # gone, or loaded since (RepositoryModelLoad)
        waiting = await asyncio.to_thread(self._signatures, self.retries.pending())
        for name in sorted(now):
            if self._seen.get(name) != now[name]:
                log.info("repository poll: model '%s' changed on disk; loading it", name)
                await self._try_load(name, waiting.get(name))
            elif name in waiting and self.retries.due(name, waiting[name]):
                log.info("repository poll: trying model '%s' again", name)
                await self._try_load(name, waiting[name])
        for name in sorted(set(self._seen) - set(now)):
            log.info("repository poll: model '%s' left the repository; unloading it", name)
            with contextlib.suppress(ConvoyError):
                await self._repo.unload(name)
        self._seen = now

    async def _try_load(self, name: str, files: Signature | None) -> None:
        if files is None:
            # Before the load: files that change while it runs are a change next poll.
            files = await asyncio.to_thread(signature, self._repo.root / name)
        try:
            await self._load(name)
        except ConvoyError as exc:
            retry = self.retries.failed(name, files)
            failure = self._repo.load_failure(name)
            at = failure.version if failure is not None and failure.error is exc else None
            log.warning(
                "repository poll: model '%s' %s failed to load: %s; trying again in %.1f s, "
                "or on the next poll that finds its files changed (attempt %d)",
                name,
                "(as a whole)" if at is None else f"version {at}",
                exc.message,
                retry.delay_ns / 1e9,
                retry.attempts,
            )
        else:
            self.retries.forget(name)

    def _signatures(self, names: Iterable[str]) -> dict[str, Signature]:
        return {name: signature(self._repo.root / name) for name in names}
