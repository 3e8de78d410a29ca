"""ONNX Runtime backend: CPU; the CUDA provider where onnxruntime-gpu is installed,
and TensorRT / OpenVINO providers where the config asks for them (Triton's
optimization.execution_accelerators) and the build has them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import Accelerator, ModelSpec, Optimization, TensorSpec
from ..errors import ConfigError
from .base import Array, BackendSignature

log = logging.getLogger(__name__)

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


Provider = str | tuple[str, dict[str, str]]

# Triton's optimization.graph.level -> ONNX Runtime's optimization level.
_GRAPH_LEVELS = {
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# Triton's names for TensorRT execution-provider options that are not ORT's own.
_TRT_KEYS = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}


def execution_providers(
    model: str, optimization: Optimization, device: str, available: Sequence[str]
) -> list[Provider]:
    """ONNX Runtime's providers, best first, from the device and the config's
    optimization.execution_accelerators (Triton's onnxruntime backend spelling):
    gpu "tensorrt" (TensorRT EP, CUDA behind it) and "cuda" (CUDA EP options), cpu
    "openvino". One that this ONNX Runtime build lacks is skipped with a warning."""
    field = "optimization.execution_accelerators"
    providers: list[Provider] = []
    on_gpu = device.startswith("cuda") and "CUDAExecutionProvider" in available
    gpu_id = device.split(":", 1)[1] if ":" in device else "0"
    cuda_options = {"device_id": gpu_id}
    for i, accelerator in enumerate(optimization.gpu_accelerators):
        where = f"{field}.gpu_execution_accelerator[{i}].name"
        if accelerator.name == "tensorrt":
            if on_gpu and _have(model, "TensorrtExecutionProvider", available):
                providers.append(("TensorrtExecutionProvider", _trt_options(accelerator, gpu_id)))
        elif accelerator.name == "cuda":
            cuda_options.update(accelerator.parameters)
        else:
            raise ConfigError(model, where, f"'{accelerator.name}': expected tensorrt or cuda")
    if on_gpu:
        providers.append(("CUDAExecutionProvider", cuda_options))
    for i, accelerator in enumerate(optimization.cpu_accelerators):
        where = f"{field}.cpu_execution_accelerator[{i}].name"
        if accelerator.name != "openvino":
            raise ConfigError(model, where, f"'{accelerator.name}': expected openvino")
        if _have(model, "OpenVINOExecutionProvider", available):
            providers.append(("OpenVINOExecutionProvider", dict(accelerator.parameters)))
    providers.append("CPUExecutionProvider")
    return providers


def _have(model: str, provider: str, available: Sequence[str]) -> bool:
    if provider not in available:
        log.warning("model '%s' asks for %s, which this ONNX Runtime lacks", model, provider)
    return provider in available


def _trt_options(accelerator: Accelerator, gpu_id: str) -> dict[str, str]:
    options = {"device_id": gpu_id}
    for key, value in accelerator.parameters.items():
        if key == "precision_mode":
            options["trt_fp16_enable"] = str(value.upper() in ("FP16", "INT8"))
            options["trt_int8_enable"] = str(value.upper() == "INT8")
        else:
            options[_TRT_KEYS.get(key, key)] = value
    return options


class OnnxRuntimeBackend:
    def __init__(
        self, model_path: Path, device: str, threads: int, spec: ModelSpec | None = None
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        optimization = spec.optimization if spec is not None else Optimization()
        options.graph_optimization_level = _GRAPH_LEVELS[optimization.graph_level]
        # Idle intra-op threads spin by default; in a server they would burn the
        # cores that the event loop and the other instances need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        name = spec.name if spec is not None else model_path.parent.parent.name
        providers = execution_providers(name, optimization, device, ort.get_available_providers())
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=providers
        )
        used = self._session.get_providers()
        self.device = device if used and used[0] in _GPU_PROVIDERS else "cpu"
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
