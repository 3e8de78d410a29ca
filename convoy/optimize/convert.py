"""The conversions themselves, each with the runtime's own tool. Blocking; minutes at
most for the built-in examples (seconds on the CNN and MiniLM)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from ..tensors import Array
from .plan import OptimizeRefused
from .samples import Sample

# Dynamic INT8 quantizes the weight-heavy matrix products only: convolutions become
# ConvInteger, which ran slower and agreed less on the example CNN. Per-channel scales
# lifted MiniLM's mean cosine from 0.94 to 0.99 (per-tensor loses small channels).
DYNAMIC_OPS = ["MatMul", "Gemm"]
CALIBRATION_BATCH = 8


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger for every model; the
    progress bar is what a user of the CLI should see."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def onnx_fp16(source: Path, target: Path) -> None:
    """FP16 weights and compute, inputs and outputs kept FP32 so clients and the config
    are unchanged (as convoy/backends/tensorrt_plan.py converts for TensorRT 11)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(half, str(target))


def onnx_int8_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=DYNAMIC_OPS,
        )


def onnx_int8_static(source: Path, target: Path, calibration: Sample) -> None:
    """QDQ format (what TensorRT and the CUDA provider read too), activation ranges
    from the calibration rows by min/max."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(
                {n: a[start : start + CALIBRATION_BATCH] for n, a in calibration.inputs.items()}
                for start in range(0, calibration.rows, CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, Array] | None:
            return next(self._batches, None)

    with _quiet_quantizer():
        quantize_static(
            source,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )


def torchscript_int8_dynamic(source: Path, target: Path) -> int:
    """Dynamic INT8 for Linear layers; returns how many were quantized.

    Graph mode (quantize_dynamic_jit) because a TorchScript file has no eager module:
    eager quantize_dynamic swaps nn.Linear children and silently changes nothing in a
    loaded ScriptModule."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic_jit

    module = torch.jit.load(str(source), map_location="cpu").eval()
    with torch.inference_mode(False), torch.no_grad():
        quantized = quantize_dynamic_jit(module, {"": per_channel_dynamic_qconfig})
    linear = sum(
        1 for n in quantized.inlined_graph.nodes() if n.kind() == "quantized::linear_dynamic"
    )
    if linear == 0:
        raise OptimizeRefused(
            "nothing_to_quantize",
            f"{source} has no Linear layers; dynamic INT8 would change nothing",
        )
    quantized.save(str(target))
    return linear
