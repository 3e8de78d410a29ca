"""The bare model files, run outside the server: what `convoy optimize` measures.
No batching, queueing or pre-processing stages: the figures are the model's own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import ModelSpec
from ..tensors import Array, numpy_dtype

# onnxruntime's element type names -> numpy
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """One input of the model file; dims include any batch dim, None where dynamic."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int | None, ...]


class Runner(Protocol):
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]

    def run(self, feed: Mapping[str, Array]) -> dict[str, Array]: ...


class OnnxRunner:
    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, every core
        options.log_severity_level = 3  # fp16 graphs warn about every Cast they keep
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = tuple(
            InputSpec(
                i.name,
                np.dtype(_ORT_DTYPES.get(i.type, np.float32)),
                tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape),
            )
            for i in self._session.get_inputs()
        )
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        values = self._session.run(list(self.output_names), dict(feed))
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}


class TorchScriptRunner:
    """Inputs bound as Convoy's pytorch backend binds them: by forward()'s parameter
    names where the config uses them, else by position in config order."""

    def __init__(self, path: Path, spec: ModelSpec, threads: int = 0) -> None:
        import torch

        if threads:  # process-wide in torch: set only when asked
            torch.set_num_threads(threads)
        self._torch = torch
        self._module = torch.jit.load(str(path), map_location="cpu").eval()
        batch: tuple[int | None, ...] = (None,) if spec.batched else ()
        arguments = [a.name for a in self._module.forward.schema.arguments[1:]]  # past self
        configured = list(spec.inputs)
        if {t.name for t in configured} == set(arguments):
            configured.sort(key=lambda t: arguments.index(t.name))
        self.inputs = tuple(
            InputSpec(
                t.name,
                numpy_dtype(t.datatype),
                (*batch, *(d if d > 0 else None for d in t.dims)),
            )
            for t in configured
        )
        self.output_names = spec.output_names

    def run(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feed[i.name])) for i in self.inputs]
            out = self._module(*args)
        values = out if isinstance(out, (tuple, list)) else (out,)
        return {n: v.detach().numpy() for n, v in zip(self.output_names, values, strict=False)}


def open_runner(spec: ModelSpec, path: Path, threads: int = 0) -> Runner:
    if spec.backend == "pytorch":
        return TorchScriptRunner(path, spec, threads)
    return OnnxRunner(path, threads)
