"""Runtimes behind one small protocol: load a model, run a batch, close."""

from .base import Backend, BackendSignature
from .factory import load_backend, probe_signature

__all__ = ["Backend", "BackendSignature", "load_backend", "probe_signature"]
