"""TensorRT build plans, kept free of TensorRT so they are testable on any machine:
the optimization profile a config implies, how the asked-for precision is reached
on the installed TensorRT, and the key of the engine cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelSpec, TensorSpec
from ..errors import ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape


def optimization_profiles(spec: ModelSpec) -> dict[str, Profile]:
    """min/opt/max shapes per input: batch 1 / half of max / max, and for each -1
    dim past the batch the range given by parameters `trt_dynamic_min|opt|max`
    (defaults 1, 128, 512; checked with the config)."""
    trt = spec.options.tensorrt
    dyn = {"min": trt.dynamic_min, "opt": trt.dynamic_opt, "max": trt.dynamic_max}
    profiles = {}
    for tensor in spec.inputs:

        def shape(batch: int, dynamic: int, t: TensorSpec = tensor) -> Shape:
            dims = tuple(dynamic if d == -1 else d for d in t.dims)
            return (batch, *dims) if spec.batched else dims

        top = max(1, spec.max_batch_size)
        profiles[tensor.name] = Profile(
            min=shape(1, dyn["min"]),
            opt=shape(max(1, top // 2), dyn["opt"]),
            max=shape(top, dyn["max"]),
        )
    return profiles


@dataclass(frozen=True)
class PrecisionPlan:
    """How an engine gets `trt_precision`. TensorRT 10 takes builder flags (FP16;
    INT8 with a calibrator). TensorRT 11 builds strongly typed networks only: its
    FP16/INT8 flags and calibrators are gone, so the ONNX graph itself must carry
    the precision (converted to fp16 here, I/O kept fp32; int8 from Q/DQ nodes)."""

    flags: tuple[str, ...] = ()  # BuilderFlag names to set
    calibrate: bool = False  # an INT8 calibrator over trt_calibration_dir
    convert_to_fp16: bool = False  # rewrite the ONNX graph to fp16 before parsing


def precision_plan(
    spec: ModelSpec, trt_major: int, has_qdq: bool, has_calibration: bool
) -> PrecisionPlan:
    field = "parameters.trt_precision"
    precision = spec.options.tensorrt.precision  # one of fp32, fp16, int8: checked with the config
    if precision == "fp32":
        return PrecisionPlan()
    if trt_major < 11:
        if precision == "fp16":
            return PrecisionPlan(flags=("FP16",))
        if not has_calibration and not has_qdq:
            raise ConfigError(
                spec.name,
                "parameters.trt_calibration_dir",
                "int8 needs a calibration set or a model with Q/DQ nodes",
            )
        return PrecisionPlan(flags=("FP16", "INT8"), calibrate=not has_qdq)
    if precision == "fp16":
        return PrecisionPlan(convert_to_fp16=True)
    if not has_qdq:
        raise ConfigError(
            spec.name,
            field,
            f"int8 on TensorRT {trt_major} needs an explicitly quantized model.onnx "
            "(QuantizeLinear/DequantizeLinear nodes, e.g. from TensorRT Model Optimizer); "
            "calibration sets serve TensorRT 10 only",
        )
    return PrecisionPlan()


def to_fp16(onnx: bytes) -> bytes:
    """The model with fp16 weights and compute, inputs and outputs kept fp32: how a
    strongly typed TensorRT builds fp16 from an fp32 export."""
    import onnx as onnx_lib
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx_lib.load_from_string(onnx)
    half = convert_float_to_float16(model, keep_io_types=True)
    return bytes(half.SerializeToString())


def has_qdq(onnx: bytes) -> bool:
    """Whether the graph is explicitly quantized (QuantizeLinear/DequantizeLinear)."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def engine_cache_key(
    onnx: bytes, gpu: str, trt_version: str, precision: str, profiles: Mapping[str, Profile]
) -> str:
    """Stable across restarts; different whenever anything the engine depends on changes."""
    digest = hashlib.sha256()
    digest.update(onnx)
    meta = {
        "gpu": gpu,
        "tensorrt": trt_version,
        "precision": precision,
        "profiles": {k: [p.min, p.opt, p.max] for k, p in sorted(profiles.items())},
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def engine_cache_dir() -> Path:
    base = os.environ.get("CONVOY_CACHE_DIR") or os.path.expanduser("~/.cache/convoy")
    return Path(base) / "engines"
