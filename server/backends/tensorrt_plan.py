"""TensorRT build plans, kept free of TensorRT so they are testable on any machine:
the optimization profile a config implies and the key of the engine cache."""

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
    (defaults 1, 128, 512)."""
    dyn = {
        key: int(spec.parameters.get(f"trt_dynamic_{key}", default))
        for key, default in (("min", 1), ("opt", 128), ("max", 512))
    }
    if not 1 <= dyn["min"] <= dyn["opt"] <= dyn["max"]:
        raise ConfigError(spec.name, "parameters.trt_dynamic_*", "need 1 <= min <= opt <= max")
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
