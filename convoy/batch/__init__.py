"""Offline scoring (DESIGN §13): `convoy batch` in process, against a live server, or on
Ray Data through ConvoyPredictor. Importing this package imports neither Ray nor a model
runtime: ConvoyPredictor is loaded on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .predictor import ConvoyPredictor

__all__ = ["ConvoyPredictor"]


def __getattr__(name: str) -> Any:
    if name == "ConvoyPredictor":
        from .predictor import ConvoyPredictor

        return ConvoyPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
