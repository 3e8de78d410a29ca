"""Convoy's Python backend: a model written as plain Python in model.py.

    backend: "convoy_python"
    <model>/<version>/model.py:
        class Model:
            def __init__(self, config: dict[str, str]) -> None: ...   # config.pbtxt parameters
            def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
            def close(self) -> None: ...                               # optional

For pre/post-processing models and glue. model.py may import modules beside it
(`import helper`): each loaded version gets its own. The file is executed: a repository
is code, as it is for Triton's python backend, so serve only repositories you
trust. Runs on the instance's thread; numpy releases the GIL for array work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelSpec
from ..errors import ConfigError, InternalError
from .base import Array
from .model_imports import ModelNamespace


class PythonBackend:
    def __init__(self, model_path: Path, device: str, spec: ModelSpec) -> None:
        self.device = "cpu"
        # model.py may import modules beside it: this version's own (model_imports.py).
        self._modules = ModelNamespace(model_path.parent)
        try:
            with self._modules.loading():
                self._model: Any = _construct(self._modules, model_path, spec)
        except BaseException:
            self._modules.close()
            raise

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        result = self._model(dict(inputs))
        missing = [name for name in output_names if name not in result]
        if missing:
            raise InternalError(f"model.py returned no output {missing}")
        return {name: np.asarray(result[name]) for name in output_names}

    def close(self) -> None:
        try:
            close = getattr(self._model, "close", None)
            if callable(close):
                close()
        finally:
            self._modules.close()


def _construct(modules: ModelNamespace, model_path: Path, spec: ModelSpec) -> Any:
    try:
        module = modules.load_model(model_path)
    except Exception as exc:
        raise ConfigError(str(model_path), "model.py", f"import failed: {exc!r}") from exc
    model_class = getattr(module, "Model", None)
    if model_class is None:
        raise ConfigError(str(model_path), "model.py", "defines no class Model")
    return model_class(dict(spec.parameters))
