"""argparse types shared by `convoy` and its subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(kind: type[float] | type[int], low: float, *, strict: bool) -> Callable[[str], float]:
    """A number above `low` (strict) or from it, else a usage error naming the value."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value != value or value < low or (strict and value == low):  # NaN too
            raise argparse.ArgumentTypeError(
                f"'{text}' must be {'above' if strict else 'at least'} {low:g}"
            )
        return value

    return parse


# gRPC's own target schemes (dns:///host:port, unix:///path, ...), passed as they are.
_GRPC_TARGETS = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock")


def grpc_address(text: str) -> str:
    """A server's KServe v2 gRPC address: host:port (as tritonclient's url), a URL
    grpc://host:port, or one of gRPC's own targets; an http(s) URL is a usage error
    (that is the REST door, not the one these commands speak)."""
    scheme, found, rest = text.partition("://")
    if not found or scheme in _GRPC_TARGETS:
        return text
    address = rest.rstrip("/")
    if scheme != "grpc" or not address or "/" in address:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a gRPC address: give host:port or grpc://host:port"
        )
    return address
