"""The one place where Convoy errors become gRPC status codes."""

from __future__ import annotations

import grpc

from ..errors import (
    Cancelled,
    ConfigError,
    ConvoyError,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
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
}


def status_code(error: ConvoyError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
