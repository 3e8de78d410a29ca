"""TorchScript backend. Inputs bind to forward() by name or config order (_bound_inputs);
outputs in config order.

On a GPU each instance owns a CUDA stream: batches are gathered straight into
the instance's pinned staging buffers and copied up without blocking, any
device stages (pre-processing kernels, pooling) and the model run on the
instance's stream, classification is ranked there, outputs come back through
pinned memory, and only the instance's own thread waits, on a CUDA event
recorded after the last copy.
config.pbtxt (GPU only):
  parameters precision               fp32 (default) | fp16 | bf16: weights and floating inputs
  parameters cuda_graph_batch_sizes  e.g. "1,8,32,64": capture a CUDA graph per batch size
                                     bucket on first use; a batch is padded up to its
                                     bucket and the padding sliced off the outputs. Needs
                                     fixed dims past the batch dimension; captured at load.
  optimization { cuda { graphs: true graph_spec [ { batch_size: 8 } ] } }
                                     the same in Triton's spelling (graph_buckets)
  optimization { cuda { busy_wait_events: true } }
                                     spin for completion instead of sleeping: lower
                                     latency for a core kept busy
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convoy.kernels.classify import topk_torch

from ..config import ModelSpec
from ..errors import InternalError
from ..tensors import Ranked, Ranking, numpy_dtype
from .base import Array
from .ranking import device_topk, rank_on_host, ranked_rows
from .stages import DeviceStages
from .staging import StagingBuffers, bring_back

# Request tensors are read-only views of the request bytes (zero copy); the
# model never writes to its inputs, so torch's warning about it is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class GraphCapture:
    """Captures CUDA graphs one at a time, in thread-local mode.

    Capture runs on a loading thread while other instances of the process serve.
    In CUDA's default (global) mode, a call that is unsafe during capture made by
    any thread (a synchronize, an event query, a cudaMalloc from torch's caching
    allocator) fails, or invalidates the capture: serving instances saw their
    allocations fail, which the circuit breaker took for a device fault. In
    thread-local mode only the capturing thread's own calls are checked. Captures
    still go one at a time: their warm-up and capture allocate from the caching
    allocator and create cuBLAS/cuDNN workspaces, state the whole process shares.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def capturing(self, graph: Any, stream: Any, pool: Any) -> Iterator[None]:
        with (
            self._lock,
            torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
        ):
            yield


# The process's one capture lock: the CUDA context it guards is per process, so a
# lock per backend or per model would not serialise anything that matters.
PROCESS_GRAPH_CAPTURE = GraphCapture()


def graph_buckets(spec: ModelSpec) -> tuple[int, ...]:
    """The batch sizes to capture CUDA graphs for, as the config resolved and checked
    them (parameter cuda_graph_batch_sizes or Triton's optimization.cuda.graphs)."""
    return spec.options.cuda_graph_batch_sizes


def _bound_inputs(module: Any, spec: ModelSpec) -> tuple[str, ...]:
    """The feed names for forward()'s parameters, in order. By name where the config
    names them (or a tokenizer feeds the model its own input_ids/attention_mask);
    otherwise by position in config order, as Triton binds INPUT__0-style names."""
    arguments = tuple(a.name for a in module.forward.schema.arguments[1:])  # past self
    configured = tuple(t.name for t in spec.inputs)
    if spec.options.text is not None or set(configured) == set(arguments):
        return arguments
    return configured


class TorchScriptBackend:
    def __init__(
        self,
        model_path: Path,
        device: str,
        spec: ModelSpec,
        capture: GraphCapture = PROCESS_GRAPH_CAPTURE,
    ) -> None:
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device if use_cuda else "cpu"
        self._torch_device = torch.device(self.device)
        self._dtype = PRECISIONS[spec.options.precision] if use_cuda else None
        buckets = graph_buckets(spec)
        # TorchScript archives hold code and tensors, not pickles of arbitrary objects.
        module = torch.jit.load(str(model_path), map_location=self._torch_device)
        if self._dtype is not None:
            module = module.to(self._dtype)
        self._module = module.eval()
        self.input_names = _bound_inputs(self._module, spec)
        # BF16 tensors arrive as uint16 bit patterns (numpy has no bfloat16).
        self._bf16 = frozenset(t.name for t in spec.inputs if t.datatype == "BF16")
        self._output_names = tuple(t.name for t in spec.outputs)
        self._stream = torch.cuda.Stream(self._torch_device) if use_cuda else None
        self._staging = StagingBuffers(pinned=use_cuda)
        self.stages = DeviceStages(self.device)  # filled by load_backend where models opt in
        self._topk = (
            device_topk(self.device, ranked_rows(spec), [self._dtype or torch.float32])
            if use_cuda
            else topk_torch
        )
        self._buckets = buckets if use_cuda else ()
        self._spec_inputs = spec.inputs
        self._blocking_wait = not spec.cuda.busy_wait_events
        self._graphs: dict[int, tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = {}
        self._graph_capture = capture
        # One memory pool for all of this instance's graphs: they never replay at the
        # same time (one batch at a time) and each one's outputs are copied out before
        # the next replay, so the intermediates of one may reuse another's memory.
        self._graph_pool: Any = None

    def prepare(self) -> None:
        """Capture every CUDA graph bucket now, at load, not in some request's path.
        Called once the device stages are registered (the graphs hold what follows them).
        Largest first: the smaller graphs then fit in the memory the largest pooled."""
        for bucket in sorted(self._buckets, reverse=True):
            zeros = {
                t.name: np.zeros((bucket, *t.dims), dtype=numpy_dtype(t.datatype))
                for t in self._spec_inputs
            }
            self.run(zeros, ())

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array | None:
        if self._stream is None or dtype.hasobject:
            return None
        return self._staging.view(name, shape, dtype)

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        return self.run_ranked(inputs, output_names, {})[0]

    def run_ranked(
        self,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Array], dict[str, Ranked]]:
        if self._stream is None:
            return self._run_cpu(inputs, output_names, rankings)
        return self._run_cuda(inputs, output_names, rankings)

    def _run_cpu(
        self,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Array], dict[str, Ranked]]:
        feed = {
            n: self._bfloat(n, torch.from_numpy(np.ascontiguousarray(self._bits(n, inputs[n]))))
            for n in self.input_names
        }
        with torch.inference_mode():
            feed = self.stages.apply_inputs(feed)
            tensors = self._outputs(self._module(*(feed[n] for n in self.input_names)))
            tensors = self.stages.apply_outputs(tensors, feed)
            outputs = {name: _to_numpy(tensors[name]) for name in output_names}
            # Ranked by value: a bfloat16 output as floats, not as its bit patterns.
            scores = {name: tensors[name].float().numpy() for name in rankings}
        ranked = rank_on_host(scores, rankings)
        return outputs, ranked

    def _outputs(self, result: Any) -> dict[str, torch.Tensor]:
        tensors = [result] if isinstance(result, torch.Tensor) else list(result)
        if len(tensors) != len(self._output_names):
            raise InternalError(
                f"model returned {len(tensors)} outputs, config declares {len(self._output_names)}"
            )
        return dict(zip(self._output_names, tensors, strict=True))

    def _bits(self, name: str, array: Array) -> Array:
        return array.view(np.int16) if name in self._bf16 else array

    def _bfloat(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(torch.bfloat16) if name in self._bf16 else tensor

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._dtype is not None and tensor.is_floating_point():
            return tensor.to(self._dtype)
        return tensor

    def _run_cuda(
        self,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Array], dict[str, Ranked]]:
        assert self._stream is not None
        # The device too, not only the stream: Triton kernels launch on the current device.
        with (
            torch.inference_mode(),
            torch.cuda.device(self._torch_device),
            torch.cuda.stream(self._stream),
        ):
            uploaded = {
                n: self._bfloat(
                    n, self._staging.upload(self._bits(n, inputs[n]), self._torch_device)
                )
                for n in self.input_names
            }
            feed = self.stages.apply_inputs(uploaded)
            args = [self._cast(feed[n]) for n in self.input_names]
            rows = int(args[0].shape[0]) if args[0].dim() else 1
            bucket = next((b for b in self._buckets if b >= rows), None)
            if bucket is None:
                outputs = self._outputs(self._module(*args))
            else:
                outputs = {k: v[:rows] for k, v in self._replay(bucket, args).items()}
            outputs = self.stages.apply_outputs(outputs, feed)
            return bring_back(
                outputs, output_names, rankings, self._topk, self._stream, self._blocking_wait
            )

    def _replay(self, bucket: int, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket, args)
            self._graphs[bucket] = graph
        cuda_graph, static_inputs, static_outputs = graph
        for static, arg in zip(static_inputs, args, strict=True):
            rows = arg.shape[0]
            static[:rows].copy_(arg)
            static[rows:].zero_()  # the padding rows only
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
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        cuda_graph = torch.cuda.CUDAGraph()
        with self._graph_capture.capturing(cuda_graph, self._stream, self._graph_pool):
            result = self._module(*static_inputs)
        static_outputs = list(self._outputs(result).values())
        return cuda_graph, static_inputs, static_outputs

    def close(self) -> None:
        self._graphs.clear()
        self._graph_pool = None
        self._staging.clear()
        del self._module


def _to_numpy(tensor: torch.Tensor) -> Array:
    """numpy has no bfloat16: such an output leaves as its uint16 bit patterns."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
        bits: Array = tensor.numpy().view(np.uint16)
        return bits
    array: Array = tensor.numpy()
    return array
