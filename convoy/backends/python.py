"""Convoy's Python backend: a model written as plain Python in model.py.

    backend: "convoy_python"
    <model>/<version>/model.py:
        class Model:
            def __init__(self, config: dict[str, str]) -> None: ...   # config.pbtxt parameters
            def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
            def close(self) -> None: ...                               # optional

For pre/post-processing models and glue. The file is executed: a repository
is code, as it is for Triton's python backend, so serve only repositories you
trust. Runs on the instance's thread; numpy releases the GIL for array work.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelSpec
from ..errors import ConfigError, InternalError
from .base import Array


class PythonBackend:
    def __init__(self, model_path: Path, device: str, spec: ModelSpec) -> None:
        self.device = "cpu"
        module_name = f"convoy_model_{spec.name}_{model_path.parent.name}_{id(self)}"
        loader_spec = importlib.util.spec_from_file_location(module_name, model_path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(str(model_path), "model.py", "cannot be imported")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(str(model_path), "model.py", f"import failed: {exc!r}") from exc
        model_class = getattr(module, "Model", None)
        if model_class is None:
            raise ConfigError(str(model_path), "model.py", "defines no class Model")
        self._model: Any = model_class(dict(spec.parameters))

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        result = self._model(dict(inputs))
        missing = [name for name in output_names if name not in result]
        if missing:
            raise InternalError(f"model.py returned no output {missing}")
        return {name: np.asarray(result[name]) for name in output_names}

    def close(self) -> None:
        close = getattr(self._model, "close", None)
        if callable(close):
            close()
