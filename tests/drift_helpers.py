"""Model specs and seeded data shared by the drift tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convoy.config import InstanceGroupSpec, ModelSpec, TensorSpec, VersionPolicy


def model_spec(
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    parameters: dict[str, str] | None = None,
    name: str = "m",
    max_batch_size: int = 8,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        backend="onnxruntime",
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        batching=None,
        instance_groups=(InstanceGroupSpec(f"{name}_0", "KIND_CPU", 1),),
        version_policy=VersionPolicy(),
        default_model_filename="model.onnx",
        parameters=parameters or {},
    )


def tabular_spec(parameters: dict[str, str] | None = None) -> ModelSpec:
    """16 numeric features in, 4 class scores out (labels a..d)."""
    return model_spec(
        (TensorSpec("INPUT0", "FP32", (16,)),),
        (TensorSpec("SCORES", "FP32", (4,), label_filename="labels.txt"),),
        parameters,
    )


def write_reference(model_dir: Path, rng: np.random.Generator, rows: int = 2000) -> Path:
    """A reference .npz for tabular_spec: standard normal inputs, their scores."""
    model_dir.mkdir(parents=True, exist_ok=True)
    inputs = rng.standard_normal((rows, 16)).astype(np.float32)
    path = model_dir / "reference.npz"
    np.savez(path, INPUT0=inputs, SCORES=scores_of(inputs))
    return path


def scores_of(inputs: np.ndarray) -> np.ndarray:
    """A fixed 'model': class scores from the first four features."""
    return np.asarray(inputs[:, :4] * np.array([1.0, 0.8, 0.6, 0.4]), dtype=np.float32)
