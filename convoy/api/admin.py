"""convoy.admin.RolloutService on grpc.aio: decode -> RolloutController -> encode.

No decisions here: validation and every error message come from the controller
and rollouts/spec.py; errors map to gRPC codes in status.py, as for inference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable

import grpc

from ..errors import ConvoyError, InternalError
from ..pb import convoy_admin_pb2 as pb
from ..pb import convoy_admin_pb2_grpc as pb_grpc
from ..rollouts.controller import RolloutController, RolloutStatus
from ..rollouts.spec import REPLAY_MAX_REQUESTS, Gates, ReplayGate, RolloutSpec, make_spec
from .status import status_code

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
# Every RPC of the service changes or reveals serving: admin role when tokens are on.
ADMIN_METHODS = frozenset(
    f"/{SERVICE_NAME}/{m.name}" for m in pb.DESCRIPTOR.services_by_name["RolloutService"].methods
)


def spec_from_proto(message: pb.RolloutSpec) -> RolloutSpec:
    gates = message.gates
    defaults = Gates()

    def gate(name: str, default: float | None) -> float | None:
        return getattr(gates, name) if gates.HasField(name) else default

    return make_spec(
        message.strategy,
        steps=tuple(message.steps) or None,
        step_interval_s=message.step_interval_s if message.HasField("step_interval_s") else 30.0,
        gates=Gates(
            max_error_rate=gate("max_error_rate", defaults.max_error_rate),
            max_p99_ms=gate("max_p99_ms", None),
            max_queue_p99_ms=gate("max_queue_p99_ms", None),
            max_divergence=gate("max_divergence", None),
            max_burn_rate=gate("max_burn_rate", None),
            min_requests=(
                gates.min_requests if gates.HasField("min_requests") else defaults.min_requests
            ),
        ),
        shadow_fraction=message.shadow_fraction if message.HasField("shadow_fraction") else None,
        keep_warm_s=message.keep_warm_s if message.HasField("keep_warm_s") else 300.0,
        salt=message.salt,
        replay=_replay_gate(message),
    )


def _replay_gate(message: pb.RolloutSpec) -> ReplayGate | None:
    if not message.HasField("replay_since"):
        return None
    return ReplayGate(
        since=message.replay_since,
        until=message.replay_until if message.HasField("replay_until") else None,
        max_diff_rate=(
            message.replay_max_diff_rate if message.HasField("replay_max_diff_rate") else 0.01
        ),
        max_requests=(
            message.replay_max_requests
            if message.HasField("replay_max_requests")
            else REPLAY_MAX_REQUESTS
        ),
    )


def status_to_proto(status: RolloutStatus) -> pb.RolloutStatus:
    out = pb.RolloutStatus(
        model=status.model,
        strategy=status.strategy,
        phase=status.phase,
        stable=status.stable,
        candidate=status.candidate,
        weights=status.weights,
        reason=status.reason,
        analysis=status.analysis,
        step=status.step,
        steps=status.steps,
        shadow_fraction=status.shadow_fraction,
        replay="" if status.replay is None else json.dumps(status.replay),
    )
    for version, stats in status.windows.items():
        window = out.windows[version]
        window.requests = stats.requests
        window.errors = stats.errors
        window.error_rate = stats.error_rate
        window.compared = stats.compared
        window.shadow_shed = stats.shadow_shed
        window.burn_slo = stats.burn_slo
        names = ("queue_p99_ms", "compute_p99_ms", "max_divergence", "top1_agreement", "burn_rate")
        for name in names:
            value = getattr(stats, name)
            if value is not None:
                # A shape mismatch is an infinite divergence; proto doubles carry inf.
                setattr(window, name, value if not math.isnan(value) else math.inf)
    return out


class RolloutServicer(pb_grpc.RolloutServiceServicer):  # type: ignore[misc]
    def __init__(self, controller: RolloutController) -> None:
        self._controller = controller

    async def Start(
        self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        async def start() -> RolloutStatus:
            spec = spec_from_proto(request.spec)
            return await self._controller.start(request.model, request.version, spec)

        return await _answer(context, start)

    async def Status(
        self, request: pb.RolloutStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatusResponse:
        try:
            rollouts = self._controller.status(request.model or None)
        except ConvoyError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        return pb.RolloutStatusResponse(rollouts=[status_to_proto(s) for s in rollouts])

    async def Promote(
        self, request: pb.RolloutModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        return await _answer(context, lambda: self._controller.promote(request.model))

    async def Rollback(
        self, request: pb.RolloutModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        return await _answer(context, lambda: self._controller.rollback(request.model))

    async def Pause(
        self, request: pb.RolloutModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        return await _answer(context, lambda: self._controller.pause(request.model))

    async def Resume(
        self, request: pb.RolloutModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        return await _answer(context, lambda: self._controller.resume(request.model))

    async def SetWeight(
        self, request: pb.SetRolloutWeightRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        return await _answer(
            context, lambda: self._controller.set_weight(request.model, request.candidate_percent)
        )


async def _answer(
    context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[RolloutStatus]]
) -> pb.RolloutStatus:
    try:
        return status_to_proto(await call())
    except ConvoyError as exc:
        await context.abort(status_code(exc), exc.message)
        raise
    except Exception as exc:  # a bug must still answer, with INTERNAL
        error = InternalError(f"internal error: {exc!r}")
        await context.abort(status_code(error), error.message)
        raise


def add_rollout_service(server: grpc.aio.Server, controller: RolloutController) -> None:
    pb_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(controller), server)
