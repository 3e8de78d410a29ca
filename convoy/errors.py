"""One error hierarchy for the whole server.

Core code raises these; each is answered with the gRPC status named in one place
(GRPC_CODE_NAMES, below), which convoy/api/status.py makes a grpc.StatusCode of. Messages
name the field or model at fault.
"""

from __future__ import annotations


class ConvoyError(Exception):
    """Base of every error Convoy answers a client with."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ConvoyError):
    """The request is malformed: wrong datatype, shape, size, name, parameter."""


class ModelNotFound(ConvoyError):
    """No such model, or no such version of it."""


class ModelNotReady(ConvoyError):
    """The model exists but is loading, unloading or failed to load."""


class Overloaded(ConvoyError):
    """A queue is full: the client should back off."""


class RateLimited(Overloaded):
    """The caller is over its rate budget (`--rate-limit`)."""


class Unavailable(ConvoyError):
    """The server or model is shutting down, or an instance failed."""


class DeadlineExceeded(ConvoyError):
    """The request's deadline passed before it could run."""


class Cancelled(ConvoyError):
    """The client went away before the answer was ready."""


class Unimplemented(ConvoyError):
    """A protocol feature Convoy does not offer (yet)."""


class RegionNotFound(ConvoyError):
    """No shared memory region of that name is registered."""


class RegionInUse(ConvoyError):
    """A shared memory region cannot be unregistered while requests use it."""


class FailedPrecondition(ConvoyError):
    """The server is not in a state to do this: a rollout's replay gate failed, or
    needs a capture the server does not write (--capture-dir)."""


class InternalError(ConvoyError):
    """A backend failed while running a batch."""


class ConfigError(ConvoyError):
    """A model configuration is invalid; the message names the file and field."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path = path
        self.field = field
        self.problem = problem


# The gRPC status code, by name, a door answers each error with (its nearest class here):
# api/status.py makes them grpc.StatusCode; capture writes the name where no door is (a
# batch job in process), in layers that never import a door.
GRPC_CODE_NAMES: dict[type[ConvoyError], str] = {
    InvalidInput: "INVALID_ARGUMENT",
    ConfigError: "INVALID_ARGUMENT",
    ModelNotFound: "NOT_FOUND",
    ModelNotReady: "UNAVAILABLE",
    Overloaded: "RESOURCE_EXHAUSTED",
    Unavailable: "UNAVAILABLE",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    Cancelled: "CANCELLED",
    Unimplemented: "UNIMPLEMENTED",
    InternalError: "INTERNAL",
    RegionNotFound: "NOT_FOUND",
    RegionInUse: "FAILED_PRECONDITION",
    FailedPrecondition: "FAILED_PRECONDITION",
}


def grpc_code_name(error: ConvoyError) -> str:
    for cls in type(error).__mro__:
        name = GRPC_CODE_NAMES.get(cls)
        if name is not None:
            return name
    return "INTERNAL"
