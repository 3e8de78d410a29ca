"""The rollout replay gate, in the server: captured traffic replayed on a candidate
before it gets any (docs/rollouts.md, "Replay gate").

The same replay as `convoy replay` (replay_cli.read_capture and replay_captured), run
through the server's own inference path as the `replay` door, so every request queues
behind every caller (DESIGN §12); Parquet is read off the event loop.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from ..errors import FailedPrecondition, InvalidInput
from ..rollouts.spec import ReplayGate, replay_window
from .replay_cli import UsageError, read_capture, replay_captured
from .replay_report import Gates, Tolerance
from .replay_targets import InProcessTarget

if TYPE_CHECKING:
    from ..inference.path import InferencePath
    from ..repository.manager import ModelRepository


class ServerReplay:
    """The RolloutController's replay hook for a server that captures to `uri`."""

    def __init__(self, repository: ModelRepository, path: InferencePath, uri: str) -> None:
        self._repo = repository
        self._path = path
        self._uri = uri

    async def __call__(
        self, model: str, baseline: str, candidate: str, gate: ReplayGate
    ) -> dict[str, Any]:
        """The report as JSON; FailedPrecondition when there is nothing to replay."""
        try:
            since, until = replay_window(gate, dt.datetime.now(dt.UTC))
        except InvalidInput as exc:
            raise FailedPrecondition(f"replay gate: {exc.message}") from None
        # Both versions serve already (the controller loaded the candidate): the target
        # borrows the server's repository and path, and is not closed here.
        target = InProcessTarget(self._repo, self._path, model, steps_loaded=True)
        try:
            captured = await read_capture(self._uri, model, since, until, gate.max_requests)
            report = await replay_captured(
                target,
                captured,
                model,
                candidate,
                baseline,
                max_requests=gate.max_requests,
                rate=None,  # background priority paces it: callers go first
                tolerance=Tolerance(),
                gates=Gates(max_diff_rate=gate.max_diff_rate),
            )
        except UsageError as exc:
            raise FailedPrecondition(f"replay gate of model '{model}': {exc}") from None
        return report.as_json()
