"""ShadowRunner: mirrored runs off the caller's path, owned and bounded.

The caller's answer never waits for a mirror: the run is a task this object
owns (close() cancels what is left), admitted by RolloutController.mirror()
(sampling and an in-flight budget: past it, shadow work is shed first), and its
outputs are compared with the caller's once it finishes. Large outputs are
compared on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from ..errors import ConvoyError
from .compare import Array, compare_outputs
from .controller import RolloutController

log = logging.getLogger(__name__)

Outputs = Mapping[str, Array]
INLINE_ELEMENTS = 16_384  # compared on the loop below this many elements (~10 us)


class ShadowRunner:
    def __init__(self, controller: RolloutController) -> None:
        self._controller = controller
        self._tasks: set[asyncio.Task[None]] = set()

    def after_answer(
        self,
        model: str,
        served: str,
        served_outputs: Outputs,
        run_on: Callable[[str], Awaitable[Outputs]],
        detach: Callable[[], None] | None = None,
    ) -> bool:
        """Maybe mirror one answered request; True when a mirrored run was started.

        `run_on(version)` runs the same request on another version (lowest
        priority) and returns its outputs; its outcome reaches record() through
        the server's usual per-run hook. `detach()`, called only when a run is
        started and before this returns, lets the caller copy what `run_on` reads
        but will not outlive the answer.
        """
        other = self._controller.mirror(model, served)
        if other is None:
            return False
        if detach is not None:
            detach()
        task = asyncio.get_running_loop().create_task(
            self._mirror(model, {served: served_outputs}, other, run_on)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A callback, not a finally: a task cancelled before it first ran never
        # enters its body, and its budget must come back all the same.
        task.add_done_callback(lambda _: self._controller.mirror_done(model))
        return True

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def _mirror(
        self,
        model: str,
        outputs: dict[str, Outputs],
        other: str,
        run_on: Callable[[str], Awaitable[Outputs]],
    ) -> None:
        try:
            outputs[other] = await run_on(other)
            size = sum(a.size for o in outputs.values() for a in o.values())
            if size <= INLINE_ELEMENTS:
                self._controller.record_comparison(model, outputs)
                return
            stable, candidate = self._controller.compared_versions(model)
            if stable not in outputs or candidate not in outputs:
                return
            divergences = await asyncio.to_thread(
                compare_outputs, outputs[stable], outputs[candidate]
            )
            self._controller.record_divergences(model, divergences)
        except ConvoyError:
            pass  # the failed run is counted by record(); nothing to compare
        except Exception:
            log.exception("mirrored run of model '%s' on version %s failed", model, other)

    async def drain(self) -> None:
        """Wait for the mirrored runs in flight now (shutdown with a grace period)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel mirrored runs still in flight and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
