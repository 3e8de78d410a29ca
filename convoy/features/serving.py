"""A model's features at load: its Feast repository opened and checked once, then a
FeatureBackend in front of each of its instances (each with a store of its own: an
instance's thread is the only one that uses it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..config import FeatureSpec, ModelSpec
from ..metrics import FeatureMetrics
from .backend import FeatureBackend
from .lookup import close_store, key_types, open_store, resolve


@dataclass(frozen=True)
class FeatureSource:
    spec: FeatureSpec  # a feature service's features resolved
    model_dir: Path
    config_path: str
    model: str
    metrics: FeatureMetrics

    def served(self, spec: ModelSpec) -> ModelSpec:
        """The model as callers and capture see it: entity inputs, features resolved."""
        return replace(spec, features=self.spec)

    def runtime(self, spec: ModelSpec) -> ModelSpec:
        """The model as its runtime sees it: config.pbtxt's inputs, the filled one too."""
        return replace(spec, inputs=self.spec.model_inputs, features=None)

    def wrap(self, backend: Backend, batched: bool) -> FeatureBackend:
        store = open_store(self.spec, self.model_dir, self.config_path)
        try:
            types = key_types(store, self.spec)
        except Exception:
            close_store(store)
            raise
        return FeatureBackend(
            backend, store, self.spec, batched, self._observe, feast_key_types=types
        )

    def _observe(
        self, seconds: float, missing: dict[str, int], ages: dict[str, list[float]]
    ) -> None:
        self.metrics.observe(self.model, seconds, missing, ages)


def open_features(
    spec: ModelSpec, model_dir: Path, config_path: str, metrics: FeatureMetrics
) -> FeatureSource:
    """Blocking (the load's worker thread): ConfigError naming the feast_* parameter at
    fault where the repository is missing, broken or lacks what the config names."""
    assert spec.features is not None
    store: Any = open_store(spec.features, model_dir, config_path)
    try:
        resolved = resolve(spec.features, store, config_path)
    finally:
        close_store(store)  # each instance opens its own
    return FeatureSource(resolved, model_dir, config_path, spec.name, metrics)
