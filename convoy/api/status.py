"""The one place where Convoy errors become gRPC status codes (by the names in
errors.GRPC_CODE_NAMES, which layers below the doors use) and HTTP statuses."""

from __future__ import annotations

import grpc

from ..errors import (
    Cancelled,
    ConfigError,
    ConvoyError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RateLimited,
    Unavailable,
    Unimplemented,
    grpc_code_name,
)


def status_code(error: ConvoyError) -> grpc.StatusCode:
    return grpc.StatusCode[grpc_code_name(error)]


# Convoy error -> HTTP status, following Triton's HttpCodeFromError for the
# TRITONSERVER_Error code Triton itself would answer with.
_HTTP: dict[type[ConvoyError], int] = {
    InvalidInput: 400,
    ConfigError: 400,
    Cancelled: 400,
    ModelNotFound: 404,
    ModelNotReady: 503,
    RateLimited: 429,  # Triton has no rate limit; 429 is HTTP's answer
    Overloaded: 503,  # Triton's "Exceeds maximum queue size" is UNAVAILABLE
    Unavailable: 503,
    DeadlineExceeded: 503,  # Triton's "Request timeout expired" is UNAVAILABLE
    Unimplemented: 501,
    FailedPrecondition: 400,
    InternalError: 500,
}


def http_status(error: ConvoyError) -> int:
    """The HTTP/REST status for an error, as Triton's HTTP endpoint answers it."""
    for cls in type(error).__mro__:
        status = _HTTP.get(cls)
        if status is not None:
            return status
    return 500
