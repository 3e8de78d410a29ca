"""Triton's `model_warmup`: sample requests run on every instance at load.

They run on the loading thread, before the model's queue opens (no batch can
reach an instance yet), so first requests do not pay for lazy initialisation:
TorchScript's profiling runs, ONNX Runtime's first allocations, kernel JIT. A
failing sample fails the load with the sample named, as in Triton.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..backends.base import Array, Backend
from ..config import CONFIG_FILENAME, ModelSpec, WarmupInput, WarmupSample
from ..errors import ConfigError, ConvoyError
from ..tensors import deserialize_bytes, numpy_dtype

log = logging.getLogger(__name__)


def sample_inputs(
    sample: WarmupSample, spec: ModelSpec, model_dir: Path, seed: int = 0
) -> dict[str, Array]:
    """The sample's input tensors, batch dimension first where the model batches."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, Array] = {}
    for name, given in sample.inputs.items():
        shape = (sample.batch_size, *given.dims) if spec.batched else given.dims
        inputs[name] = _data(given, shape, rng, model_dir, f"model_warmup '{sample.name}' {name}")
    return inputs


def _data(
    given: WarmupInput,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    model_dir: Path,
    where: str,
) -> Array:
    count = int(np.prod(shape))
    if given.datatype == "BYTES":
        if given.source == "file":
            data = _read(model_dir, given.file, where)
            return deserialize_bytes(data, count, where).reshape(shape)
        out = np.empty(count, dtype=np.object_)
        for i in range(count):
            out[i] = b"" if given.source == "zero" else bytes(rng.integers(97, 123, 8).tolist())
        return out.reshape(shape)
    dtype = numpy_dtype(given.datatype)
    if given.source == "zero":
        return np.zeros(shape, dtype=dtype)
    if given.source == "random":
        if dtype.kind == "f":
            return rng.random(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 100, shape).astype(dtype)
    data = _read(model_dir, given.file, where)
    if len(data) != count * dtype.itemsize:
        raise ConfigError(
            str(model_dir / "warmup" / given.file),
            "input_data_file",
            f"holds {len(data)} bytes; {list(shape)} of {given.datatype} needs "
            f"{count * dtype.itemsize}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _read(model_dir: Path, name: str, where: str) -> bytes:
    path = model_dir / "warmup" / name
    if not path.is_file():
        raise ConfigError(str(path), "input_data_file", f"{where}: no such file in warmup/")
    return path.read_bytes()


def warm_up(backends: Sequence[Backend], spec: ModelSpec, model_dir: Path) -> None:
    """Run every sample `count` times on every backend. Blocking: call it off the loop."""
    for sample in spec.warmup:
        inputs = sample_inputs(sample, spec, model_dir)
        start = time.perf_counter()
        for backend in backends:
            for _ in range(sample.count):
                try:
                    backend.run(inputs, spec.output_names)
                except ConvoyError:
                    raise
                except Exception as exc:
                    raise ConfigError(
                        str(model_dir / CONFIG_FILENAME),
                        f"model_warmup '{sample.name}'",
                        f"the sample failed on {backend.device}: {exc}",
                    ) from exc
        log.info(
            "model '%s': warm-up '%s' ran %d time(s) on %d instance(s) in %.3f s",
            spec.name,
            sample.name,
            sample.count,
            len(backends),
            time.perf_counter() - start,
        )
