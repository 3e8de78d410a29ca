"""Declared rollouts: a model directory's rollout.json starts a rollout by itself.

When a model that declares a rollout is loaded again (RepositoryModelLoad, or the
repository poll) and a newer version has appeared on disk, the version serving now
is pinned *before* the reload, so Triton's "latest version" rule never hands the
new version all traffic; the declared rollout then decides how it gets traffic.
A model without rollout.json is loaded exactly as Triton would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..errors import ConvoyError
from ..repository.manager import ModelRepository
from .controller import RolloutController
from .declared import read_policy

log = logging.getLogger(__name__)


# (model, reason) -> the model loaded: the repository's own load, else on-demand's.
Load = Callable[[str, str], Awaitable[None]]


class DeclaredRollouts:
    def __init__(
        self,
        repository: ModelRepository,
        controller: RolloutController,
        load: Load | None = None,
    ) -> None:
        self._repo = repository
        self._controller = controller
        # On demand, an explicit load makes room within the budget like a first request.
        self._load: Load = load or repository.load

    async def load(self, name: str, reason: str = "explicit") -> None:
        """Load (or reload) a model; start its declared rollout for a new version.
        `reason`: what asked (explicit, poll), as convoy_model_loads_total counts it."""
        spec = await asyncio.to_thread(read_policy, self._repo.model_dir(name))
        if spec is None:
            await self._load(name, reason)
            return
        try:
            current: str | None = self._repo.default_version(name)
        except ConvoyError:
            current = None  # nothing serves yet: the first load follows Triton's rule
        if current is not None:
            self._repo.set_default(name, current)
        await self._load(name, reason)
        if current is None:
            return
        newest = max(self._repo.versions_on_disk(name), key=int)
        status = await self._controller.start_declared(name, newest, spec)
        if status is not None:
            log.info("model '%s': declared %s rollout of version %s started", name,
                     status.strategy, newest)  # fmt: skip
