"""Convoy: a high-throughput inference server speaking Triton's gRPC protocol."""

__version__ = "0.1.0"
