"""The Backend protocol and the factory that picks a runtime for a model.

A backend instance belongs to exactly one model instance and is only ever
called from that instance's thread, so implementations need no locking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..batching.request import Ranked, Ranking
from ..config import ModelSpec, TensorSpec
from ..errors import ConfigError
from .stages import device_stages

Array = npt.NDArray[np.generic]


@dataclass(frozen=True)
class BackendSignature:
    """Inputs and outputs as the model file declares them (dims include any batch dim)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_dim_dynamic: bool


class Backend(Protocol):
    device: str  # "cpu" or "cuda:N": the label on metrics

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """Run one batch; blocking, called on the instance's own thread."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StagesInputs(Protocol):
    """A GPU backend with per-instance pinned buffers that batches are gathered in."""

    def input_buffer(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> Array | None: ...


@runtime_checkable
class RanksOnDevice(Protocol):
    """A GPU backend that ranks outputs for classification before copying them back,
    so only the top-k of an output asked for nothing else crosses the bus."""

    def run_ranked(
        self,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Array], dict[str, Ranked]]:
        """Like run, plus the rankings; `output_names` are those wanted in full."""
        ...


def default_threads(instances: int) -> int:
    """Intra-op threads per instance so that all instances together fill the cores once."""
    return max(1, (os.cpu_count() or 1) // max(1, instances))


def load_backend(spec: ModelSpec, model_path: Path, device: str, threads: int) -> Backend:
    """Construct the runtime for `spec` on `device`; blocking (run it off the event loop)."""
    # TensorRT may build its engine from a model.onnx beside the missing model.plan.
    onnx_source = spec.backend == "tensorrt" and model_path.with_name("model.onnx").exists()
    if not model_path.exists() and not onnx_source:
        raise ConfigError(str(model_path), "default_model_filename", "model file not found")
    backend: Backend
    if spec.backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(model_path, device, _threads(spec, threads), spec)
    elif spec.backend == "pytorch":
        from .pytorch import TorchScriptBackend

        backend = TorchScriptBackend(model_path, device, spec)
    elif spec.backend == "convoy_python":
        from .python import PythonBackend

        backend = PythonBackend(model_path, device, spec)
    elif spec.backend == "tensorrt":
        try:
            from .tensorrt import TensorRTBackend
        except ImportError as exc:
            raise ConfigError(
                str(model_path), "backend", f"TensorRT is not available here ({exc})"
            ) from None
        backend = TensorRTBackend(model_path, device, spec)
    else:
        raise ConfigError(str(model_path), "backend", f"unsupported backend '{spec.backend}'")
    # Work around the model: GPU kernels on the runtime's stream where it keeps
    # tensors on a GPU, the numpy references on the instance's thread elsewhere.
    stages = device_stages(backend)
    if "preprocess" in spec.parameters:
        from .preprocess import with_image_preprocessing

        backend = with_image_preprocessing(backend, spec, stages)
    if "tokenizer" in spec.parameters:
        from .text import TokenizingBackend

        backend = TokenizingBackend(backend, spec, model_path.parent, stages)
    prepare = getattr(backend, "prepare", None)
    if callable(prepare):
        prepare()  # e.g. capture CUDA graphs, with the stages above in place
    return backend


def probe_signature(backend_name: str, model_path: Path) -> BackendSignature | None:
    """What the model file declares, for auto-completing a config; None if unknown."""
    if backend_name == "onnxruntime" and model_path.exists():
        from .onnxruntime import onnx_signature

        return onnx_signature(model_path)
    return None


def _threads(spec: ModelSpec, fallback: int) -> int:
    # Same parameter name as Triton's onnxruntime backend.
    value = spec.parameters.get("intra_op_thread_count")
    if value is None:
        return fallback
    try:
        threads = int(value)
    except ValueError:
        raise ConfigError(
            spec.name, "parameters.intra_op_thread_count", f"'{value}' is not an integer"
        ) from None
    return threads if threads > 0 else fallback
