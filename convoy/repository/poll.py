"""--repository-poll-secs: Triton's poll mode.

Every interval the repository directory is scanned off the event loop; a model
whose version directories, config.pbtxt or rollout.json changed, or that is new,
is loaded again (through the server's load path, so a declared rollout starts);
a model whose directory disappeared is unloaded. The task is started and stopped
by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..config import CONFIG_FILENAME
from ..errors import ConvoyError
from .manager import ModelRepository

log = logging.getLogger(__name__)

# model -> (version directories, config.pbtxt mtime, rollout.json mtime)
Snapshot = dict[str, tuple[tuple[str, ...], int, int]]


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


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


class RepositoryPoller:
    def __init__(
        self,
        repository: ModelRepository,
        load: Callable[[str], Awaitable[None]],
        interval_s: float,
    ) -> None:
        self._repo = repository
        self._load = load
        self._interval = interval_s
        self._seen: Snapshot = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take the current state as seen (models just loaded), then poll."""
        self._seen = await asyncio.to_thread(scan, self._repo)
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
        for name in sorted(now):
            if self._seen.get(name) == now[name]:
                continue
            log.info("repository poll: model '%s' changed on disk; loading it", name)
            try:
                await self._load(name)
            except ConvoyError as exc:
                log.error("repository poll: model '%s' failed to load: %s", name, exc.message)
        for name in sorted(set(self._seen) - set(now)):
            log.info("repository poll: model '%s' left the repository; unloading it", name)
            with contextlib.suppress(ConvoyError):
                await self._repo.unload(name)
        self._seen = now
