"""The one place where Convoy errors become gRPC status codes and HTTP statuses."""

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
    RegionInUse,
    RegionNotFound,
    Unavailable,
    Unimplemented,
)

_CODES: dict[type[ConvoyError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    InternalError: grpc.StatusCode.INTERNAL,
    RegionNotFound: grpc.StatusCode.NOT_FOUND,
    RegionInUse: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code(error: ConvoyError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


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
