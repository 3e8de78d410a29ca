"""TorchScript backend. Inputs bind to forward() in config order; outputs likewise.

On a GPU each instance owns a CUDA stream: inputs go through pinned host memory
with non-blocking copies, the model runs on the instance's stream, outputs come
back the same way, and only the instance's own thread waits for the stream.
config.pbtxt `parameters` (GPU only):
  precision                fp32 (default) | fp16 | bf16: weights and floating inputs
  cuda_graph_batch_sizes   e.g. "1,8,32,64": capture a CUDA graph per batch size
                           bucket on first use; a batch is padded up to its bucket
                           and the padding sliced off the outputs. Needs fixed
                           dims past the batch dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelSpec
from ..errors import ConfigError, InternalError
from .base import Array

# Request tensors are read-only views of the request bytes (zero copy); the
# model never writes to its inputs, so torch's warning about it is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _graph_buckets(spec: ModelSpec) -> tuple[int, ...]:
    text = spec.parameters.get("cuda_graph_batch_sizes")
    if not text:
        return ()
    field = "parameters.cuda_graph_batch_sizes"
    try:
        sizes = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise ConfigError(spec.name, field, f"'{text}' is not a list of integers") from None
    if not spec.batched or sizes[0] < 1 or sizes[-1] > spec.max_batch_size:
        raise ConfigError(
            spec.name, field, f"sizes must lie in 1..max_batch_size ({spec.max_batch_size})"
        )
    if any(-1 in t.dims for t in spec.inputs):
        raise ConfigError(spec.name, field, "CUDA graphs need fixed input dims past the batch")
    return sizes


class TorchScriptBackend:
    def __init__(self, model_path: Path, device: str, spec: ModelSpec) -> None:
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device if use_cuda else "cpu"
        self._torch_device = torch.device(self.device)
        precision = spec.parameters.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ConfigError(
                spec.name, "parameters.precision", f"'{precision}' is not one of {list(PRECISIONS)}"
            )
        self._dtype = PRECISIONS[precision] if use_cuda else None
        buckets = _graph_buckets(spec)
        # TorchScript archives hold code and tensors, not pickles of arbitrary objects.
        module = torch.jit.load(str(model_path), map_location=self._torch_device)
        if self._dtype is not None:
            module = module.to(self._dtype)
        self._module = module.eval()
        self._input_names = tuple(t.name for t in spec.inputs)
        self._output_names = tuple(t.name for t in spec.outputs)
        self._stream = torch.cuda.Stream(self._torch_device) if use_cuda else None
        self._buckets = buckets if use_cuda else ()
        self._graphs: dict[int, tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = {}

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        if self._stream is None:
            args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self._input_names]
            with torch.inference_mode():
                tensors = self._outputs(self._module(*args))
            return {name: tensors[name].numpy() for name in output_names}
        return self._run_cuda(inputs, output_names)

    def _outputs(self, result: Any) -> dict[str, torch.Tensor]:
        tensors = [result] if isinstance(result, torch.Tensor) else list(result)
        if len(tensors) != len(self._output_names):
            raise InternalError(
                f"model returned {len(tensors)} outputs, config declares {len(self._output_names)}"
            )
        return dict(zip(self._output_names, tensors, strict=True))

    def _to_device(self, array: Array) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
        tensor = host.to(self._torch_device, non_blocking=True)
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        return tensor

    def _run_cuda(
        self, inputs: Mapping[str, Array], output_names: Sequence[str]
    ) -> dict[str, Array]:
        assert self._stream is not None
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            args = [self._to_device(inputs[n]) for n in self._input_names]
            rows = int(args[0].shape[0])
            bucket = next((b for b in self._buckets if b >= rows), None)
            if bucket is None:
                outputs = self._outputs(self._module(*args))
            else:
                outputs = {k: v[:rows] for k, v in self._replay(bucket, args).items()}
            host = {}
            for name in output_names:
                value = outputs[name]
                if value.is_floating_point() and value.dtype != torch.float32:
                    value = value.float()
                pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                pinned.copy_(value, non_blocking=True)
                host[name] = pinned
        self._stream.synchronize()  # this instance's thread waits; the event loop never does
        return {name: tensor.numpy() for name, tensor in host.items()}

    def _replay(self, bucket: int, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket, args)
            self._graphs[bucket] = graph
        cuda_graph, static_inputs, static_outputs = graph
        for static, arg in zip(static_inputs, args, strict=True):
            static.zero_()
            static[: arg.shape[0]].copy_(arg)
        cuda_graph.replay()
        return dict(zip(self._output_names, static_outputs, strict=True))

    def _capture(
        self, bucket: int, args: list[torch.Tensor]
    ) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
        static_inputs = [
            torch.zeros((bucket, *a.shape[1:]), dtype=a.dtype, device=a.device) for a in args
        ]
        for _ in range(3):  # warm up on the side stream before capture, as CUDA graphs require
            self._module(*static_inputs)
        torch.cuda.current_stream().synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, stream=self._stream):
            result = self._module(*static_inputs)
        static_outputs = list(self._outputs(result).values())
        return cuda_graph, static_inputs, static_outputs

    def close(self) -> None:
        self._graphs.clear()
        del self._module
