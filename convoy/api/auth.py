"""Bearer-token authentication and roles at the doors, and the rate budget of the RPCs
that are not inferences, as one interceptor.

Tokens come from a file (`--auth-tokens FILE`), one per line: `TOKEN ROLE`,
ROLE being `infer` (inference and metadata) or `admin` (also load/unload).
Clients send `authorization: Bearer TOKEN` metadata (tritonclient: `headers=`).
Missing or unknown token: UNAUTHENTICATED. Known token, forbidden RPC:
PERMISSION_DENIED. Over its rate: RESOURCE_EXHAUSTED. Health checks and the
liveness/readiness RPCs stay open so that probes work without credentials.

The rate budget is the inference path's one `RateBudget`: inferences are charged there,
one by one (stream messages too), by every door and front-end process alike; the other
RPCs are charged here, against the same buckets. A front-end process checks tokens and
roles but holds no budget: the engine charges what it forwards.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..errors import ConfigError, RateLimited
from ..inference.admission import RateBudget, client_id
from .admin import ADMIN_METHODS as ROLLOUT_METHODS

Metadata = Sequence[tuple[str, str | bytes]]

ROLES = ("infer", "admin")
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
# Charged one by one by the inference path (a stream per message), not at the call.
INFER_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
    }
)
ADMIN_METHODS = (
    frozenset(
        {
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            "/inference.GRPCInferenceService/RepositoryModelUnload",
            "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
            "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
            "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
            "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
            "/inference.GRPCInferenceService/TraceSetting",
            "/inference.GRPCInferenceService/LogSettings",
        }
    )
    | ROLLOUT_METHODS
)  # Convoy's own admin service: every call needs the admin role


def load_tokens(path: Path) -> dict[str, str]:
    """Parse a token file; ConfigError names the line at fault."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ROLES:
            raise ConfigError(
                str(path), f"line {number}", f"expected 'TOKEN ROLE' with ROLE in {ROLES}"
            )
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise ConfigError(str(path), "<file>", "no tokens")
    return tokens


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    message: str


class AccessPolicy:
    """Decides, per call, whether it may proceed. Pure: testable without gRPC.

    `tokens` None: no authentication (every caller is one anonymous client). `budget`:
    the server's rate budget, charged here for every RPC but the inferences (charged by
    the inference path); None: no rate limit here (a front-end process)."""

    def __init__(self, tokens: dict[str, str] | None, budget: RateBudget | None = None) -> None:
        self._tokens = tokens
        self._budget = budget

    @property
    def active(self) -> bool:
        return self._tokens is not None or self._budget is not None

    def client(self, metadata: Metadata) -> str:
        """The name the caller's budget is kept under (admission.client_id)."""
        return client_id(_bearer(metadata) if self._tokens is not None else None)

    def check(self, method: str, metadata: Metadata) -> Denial | None:
        if method in OPEN_METHODS:
            return None
        if self._tokens is not None:
            token = _bearer(metadata)
            if token is None:
                return Denial(
                    grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer' metadata"
                )
            role = self._role(token)
            if role is None:
                return Denial(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
            if method in ADMIN_METHODS and role != "admin":
                return Denial(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method.rsplit('/', 1)[-1]} needs the admin role; this token has '{role}'",
                )
        if self._budget is not None and method not in INFER_METHODS:
            try:
                self._budget.admit(self.client(metadata))
            except RateLimited as exc:
                return Denial(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
        return None

    def _role(self, token: str) -> str | None:
        assert self._tokens is not None
        for known, role in self._tokens.items():
            # Constant-time comparison: no timing oracle on token prefixes.
            if hmac.compare_digest(known.encode(), token.encode()):
                return role
        return None


def _bearer(metadata: Metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        denial = self._policy.check(details.method, details.invocation_metadata)
        handler = await continuation(details)
        if denial is None or handler is None:
            return handler
        return _refusing(handler, denial)


def _refusing(handler: grpc.RpcMethodHandler, denial: Denial) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(denial.code, denial.message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(denial.code, denial.message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
