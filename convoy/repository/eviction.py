"""Which loaded models to unload: the on-demand loader's decisions, as plain objects.

A load that would pass a memory budget evicts the least recently used models that
nothing holds (no request queued, running or waiting for them) and that are not pinned,
oldest first, just enough for it to fit; where those are not enough, the loader may ask
again with busy models included (after the idle ones: it drains them first). If even
that would not make room, nothing is evicted and the load is refused. A model idle for
`idle_ns` is unloaded. Sizes are what each load measured (DESIGN §14); the clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..batching.queue import Clock
from .memory import HOST


@dataclass(frozen=True)
class Resident:
    """One loaded model, as the policy sees it."""

    name: str
    memory: Mapping[str, int]  # device -> bytes measured at its load
    last_used_ns: int  # when its last request was answered (or it loaded)
    busy: bool  # a request holds it: queued, running, or waiting for it
    pinned: bool  # --load-model, or under a rollout


@dataclass(frozen=True)
class Shortfall:
    """Why a load cannot fit even with every evictable model gone."""

    device: str
    budget: int
    need: int
    kept: int  # bytes held there by models that cannot be evicted


@dataclass(frozen=True)
class EvictionPlan:
    victims: tuple[str, ...]  # to unload first, oldest use first
    shortfall: Shortfall | None = None  # set: refuse the load, evict nothing


class EvictionPolicy:
    def __init__(
        self,
        host_budget: int | None,
        gpu_budget: int | None,
        idle_ns: int | None = None,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self.host_budget = host_budget
        self.gpu_budget = gpu_budget  # each GPU's
        self.idle_ns = idle_ns
        self.clock = clock

    def budget(self, device: str) -> int | None:
        return self.host_budget if device == HOST else self.gpu_budget

    def plan(
        self, need: Mapping[str, int], residents: Sequence[Resident], include_busy: bool = False
    ) -> EvictionPlan:
        """What to evict so a load needing `need` (device -> bytes) fits; with
        `include_busy`, busy models too (after every idle one), to be drained first."""
        held: dict[str, int] = {}
        for resident in residents:
            for device, size in resident.memory.items():
                held[device] = held.get(device, 0) + size

        def over() -> list[str]:
            return [
                d
                for d, size in need.items()
                if (b := self.budget(d)) is not None and held.get(d, 0) + size > b
            ]

        victims: list[str] = []
        evictable = sorted(
            (r for r in residents if (include_busy or not r.busy) and not r.pinned),
            key=lambda r: (r.busy, r.last_used_ns, r.name),
        )
        for resident in evictable:
            devices = over()
            if not devices:
                break
            if not any(resident.memory.get(d, 0) > 0 for d in devices):
                continue  # frees nothing where room is short
            victims.append(resident.name)
            for device, size in resident.memory.items():
                held[device] = held.get(device, 0) - size
        devices = over()
        if devices:
            device = devices[0]
            budget = self.budget(device)
            assert budget is not None
            return EvictionPlan((), Shortfall(device, budget, need[device], held.get(device, 0)))
        return EvictionPlan(tuple(victims))

    def idle(self, residents: Sequence[Resident]) -> list[str]:
        """The models idle for idle_ns or longer, that nothing holds, oldest first."""
        if self.idle_ns is None:
            return []
        now = self.clock()
        idle = [
            r
            for r in residents
            if not r.busy and not r.pinned and now - r.last_used_ns >= self.idle_ns
        ]
        return [r.name for r in sorted(idle, key=lambda r: r.last_used_ns)]
