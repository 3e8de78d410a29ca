"""ONNX Runtime backend (CPU; CUDA provider where onnxruntime-gpu is installed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import TensorSpec
from .base import Array, BackendSignature

# ONNX Runtime's type strings -> wire datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = device.split(":", 1)[1] if ":" in device else "0"
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    def __init__(self, model_path: Path, device: str, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads spin by default; in a server they would burn the
        # cores that the event loop and the other instances need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=_providers(device)
        )
        used = self._session.get_providers()
        self.device = device if used and used[0] == "CUDAExecutionProvider" else "cpu"
        self.input_names = tuple(i.name for i in self._session.get_inputs())

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        results = self._session.run(list(output_names), dict(inputs))
        return {name: np.asarray(value) for name, value in zip(output_names, results, strict=True)}

    def close(self) -> None:
        del self._session


def onnx_signature(model_path: Path) -> BackendSignature:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def specs(values: Sequence[ort.NodeArg]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                name=v.name,
                datatype=_ORT_TYPES.get(v.type, "FP32"),
                dims=tuple(d if isinstance(d, int) and d > 0 else -1 for d in v.shape),
            )
            for v in values
        )

    inputs = specs(session.get_inputs())
    outputs = specs(session.get_outputs())
    dynamic = all(t.dims and t.dims[0] == -1 for t in (*inputs, *outputs))
    return BackendSignature(inputs=inputs, outputs=outputs, batch_dim_dynamic=dynamic)
