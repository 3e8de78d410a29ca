"""TensorRT backend (gpu extra: tensorrt, cuda-python; torch for device memory and streams).

A version directory holds `model.plan` (a serialised engine), or `model.onnx`
that Convoy builds into an engine on first load: FP16 (INT8 with a calibration
set or Q/DQ nodes; on TensorRT 11, which builds strongly typed networks only,
FP16 by converting the graph and INT8 from Q/DQ nodes: tensorrt_plan.py), one
optimization profile derived from max_batch_size and the -1 dims,
cached under $CONVOY_CACHE_DIR/engines keyed by the ONNX bytes, the GPU, the
TensorRT version and the build options, so a restart never rebuilds.

Each instance owns an execution context, a CUDA stream, pinned host staging
buffers that batches are gathered in, and device buffers for the largest
profile shape; copies, device stages (pre-processing kernels, pooling),
`execute_async_v3` and classification ranking are enqueued on the stream; the
instance's thread sleeps on a CUDA event recorded after the last copy (the
event loop never waits; completion reaches it through call_soon_threadsafe, as
for every instance).

An input shape outside the engine's optimisation profile is INVALID_ARGUMENT
naming the input and the profile's bounds: at decode where the frontend asks
input_bounds() (base.py), else for the batch, before anything is enqueued.

The import of this module fails where TensorRT is absent; load_backend turns
that into a clear configuration error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt
import torch

from ..config import ModelSpec
from ..errors import ConfigError, InternalError, InvalidInput
from ..tensors import Ranked, Ranking
from .base import Array, ShapeRange
from .ranking import device_topk, ranked_rows
from .stages import DeviceStages
from .staging import StagingBuffers, bring_back
from .tensorrt_plan import (
    PrecisionPlan,
    Profile,
    Shape,
    engine_cache_dir,
    engine_cache_key,
    has_qdq,
    optimization_profiles,
    precision_plan,
    to_fp16,
)

log = logging.getLogger(__name__)

_LOGGER = trt.Logger(trt.Logger.WARNING)
# TensorRT's tensor types -> torch's; looked up by name, as the set differs by release.
_TORCH_DTYPES = {
    getattr(trt.DataType, name): dtype
    for name, dtype in (
        ("FLOAT", torch.float32),
        ("HALF", torch.float16),
        ("BF16", torch.bfloat16),
        ("INT32", torch.int32),
        ("INT64", torch.int64),
        ("INT8", torch.int8),
        ("UINT8", torch.uint8),
        ("BOOL", torch.bool),
    )
    if hasattr(trt.DataType, name)
}


class _Progress(trt.IProgressMonitor):  # type: ignore[misc]
    """Reports build phases to a callback (the CLI draws a bar; the server logs)."""

    def __init__(self, report: Callable[[str, int, int], None]) -> None:
        trt.IProgressMonitor.__init__(self)
        self._report = report
        self._steps: dict[str, int] = {}
        self._lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._steps[phase_name] = num_steps
        self._report(phase_name, 0, num_steps)

    def step_complete(self, phase_name: str, step: int) -> bool:
        self._report(phase_name, step + 1, self._steps.get(phase_name, step + 1))
        return True  # never cancel

    def phase_finish(self, phase_name: str) -> None:
        total = self._steps.get(phase_name, 1)
        self._report(phase_name, total, total)


def _calibrator(directory: Path, cache: Path) -> object:
    """INT8 calibration from .npz files (one array per input name) in a directory.
    TensorRT 10 only (11 dropped implicit quantization): defined when first needed."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._files = sorted(directory.glob("*.npz"))
            if not self._files:
                raise ConfigError(
                    str(directory), "parameters.trt_calibration_dir", "no .npz batches"
                )
            self._index = 0
            self._held: list[torch.Tensor] = []
            first = np.load(self._files[0])
            self._batch = int(next(iter(first.values())).shape[0])

        def get_batch_size(self) -> int:
            return self._batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._index >= len(self._files):
                return None
            arrays = np.load(self._files[self._index])
            self._index += 1
            self._held = [torch.from_numpy(arrays[n]).cuda() for n in names]
            return [int(t.data_ptr()) for t in self._held]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: bytes) -> None:
            cache.write_bytes(data)

    return Calibrator()


def build_engine(
    onnx_path: Path,
    spec: ModelSpec,
    gpu: int = 0,
    report: Callable[[str, int, int], None] | None = None,
) -> Path:
    """The engine for onnx_path on this GPU: from the cache, else built (minutes) and cached."""
    onnx = onnx_path.read_bytes()
    calibration = spec.options.tensorrt.calibration_dir
    major = int(trt.__version__.split(".")[0])
    plan_of_precision = precision_plan(spec, major, has_qdq(onnx), calibration is not None)
    precision = spec.options.tensorrt.precision
    profiles = optimization_profiles(spec)
    gpu_name = torch.cuda.get_device_name(gpu) + str(torch.cuda.get_device_capability(gpu))
    key = engine_cache_key(onnx, gpu_name, trt.__version__, precision, profiles)
    plan = engine_cache_dir() / f"{spec.name}-{key}.plan"
    if plan.exists():
        return plan
    log.info("building a TensorRT engine for %s (%s); this takes minutes", spec.name, precision)
    if plan_of_precision.convert_to_fp16:
        onnx = to_fp16(onnx)  # strongly typed TensorRT: the graph carries the precision
    # The builder times kernels on the current device; the caller's is restored after.
    with torch.cuda.device(gpu):
        serialized = _build(onnx, onnx_path, spec, plan, profiles, plan_of_precision, report)
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_suffix(".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.rename(plan)
    return plan


def _build(
    onnx: bytes,
    onnx_path: Path,
    spec: ModelSpec,
    plan: Path,
    profiles: Mapping[str, Profile],
    plan_of_precision: PrecisionPlan,
    report: Callable[[str, int, int], None] | None,
) -> Any:
    """The serialised engine, built on the current device."""
    calibration = spec.options.tensorrt.calibration_dir
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(str(onnx_path), "model.onnx", f"TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    for flag in plan_of_precision.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan_of_precision.calibrate:
        assert calibration is not None  # precision_plan refuses int8 without one
        config.int8_calibrator = _calibrator(
            onnx_path.parent / calibration, plan.with_suffix(".calib")
        )
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    monitor = _Progress(report or _log_progress)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InternalError(f"TensorRT failed to build an engine for {spec.name}")
    return serialized


def _log_progress(phase: str, step: int, total: int) -> None:
    if step in (0, total):
        log.info("TensorRT build: %s %d/%d", phase, step, total)


class TensorRTBackend:
    def __init__(self, model_path: Path, device: str, spec: ModelSpec) -> None:
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise ConfigError(spec.name, "instance_group", "TensorRT instances need a GPU")
        self.device = device
        self._torch_device = torch.device(device)
        self._batched = spec.batched
        self._request_inputs = frozenset(t.name for t in spec.inputs)
        self._blocking_wait = not spec.cuda.busy_wait_events
        if spec.cuda.graphs:
            log.warning("%s: CUDA graphs are not used for TensorRT instances", spec.name)
        self.stages = DeviceStages(device)  # filled by load_backend where models opt in
        # An engine, its execution context and its buffers belong to the device that
        # was current when they were made: make it this instance's, whatever the
        # loading thread had current.
        with torch.cuda.device(self._torch_device):
            self._open(model_path, spec)

    def _open(self, model_path: Path, spec: ModelSpec) -> None:
        gpu = self._torch_device.index or 0
        if model_path.suffix == ".onnx" or not model_path.exists():
            onnx = model_path.with_name("model.onnx")
            if not onnx.exists():
                raise ConfigError(
                    str(model_path), "default_model_filename", "no model.plan or model.onnx"
                )
            model_path = build_engine(onnx, spec, gpu)
        runtime = trt.Runtime(_LOGGER)
        self._engine = runtime.deserialize_cuda_engine(model_path.read_bytes())
        if self._engine is None:
            raise ConfigError(str(model_path), "model.plan", "not an engine for this GPU/TensorRT")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self._torch_device)
        self._staging = StagingBuffers(pinned=True)
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            mode = self._engine.get_tensor_mode(name)
            (self._inputs if mode == trt.TensorIOMode.INPUT else self._outputs).append(name)
        self.input_names = tuple(self._inputs)  # what a tokenizer in front must feed
        self.profiles = {  # profile 0, the one Convoy builds and binds
            name: Profile(
                *(tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0))
            )
            for name in self._inputs
        }
        _check_profiles(self.profiles, spec, str(model_path))
        # Device buffers, allocated once per instance: inputs for the largest profile
        # shape; outputs for the output shapes that the largest input shapes give.
        self._buffers: dict[str, torch.Tensor] = {}
        for name in self._inputs:
            largest = self.profiles[name].max
            self._set_shape(name, largest)
            self._buffers[name] = self._alloc(name, largest)
            buffer = self._buffers[name]
            self._staging.reserve(name, buffer.numel() * buffer.element_size())
        for name in self._outputs:
            self._buffers[name] = self._alloc(name, tuple(self._context.get_tensor_shape(name)))
        dtypes = {
            self._buffers[n].dtype for n in self._outputs if self._buffers[n].is_floating_point()
        }
        self._topk = device_topk(self.device, ranked_rows(spec), sorted(dtypes, key=str))

    def input_bounds(self) -> dict[str, ShapeRange]:
        """The engine's optimisation profile per request input, per item: what a
        request may send, checked at decode. Inputs reshaped by a device stage in
        front (image pre-processing) are left to the stage."""
        cut = 1 if self._batched else 0
        return {
            name: ShapeRange(profile.min[cut:], profile.max[cut:])
            for name, profile in self.profiles.items()
            if name in self._request_inputs and name not in self.stages.inputs
        }

    def _set_shape(self, name: str, shape: Shape) -> None:
        # TensorRT answers False, and logs, for a shape outside the profile; executing
        # anyway would fail the whole batch with an opaque error.
        if not self._context.set_input_shape(name, shape):
            profile = self.profiles[name]
            raise InvalidInput(
                f"input '{name}': shape {list(shape)} is outside the TensorRT optimisation "
                f"profile (min {list(profile.min)}, max {list(profile.max)})"
            )

    def _alloc(self, name: str, shape: Shape) -> torch.Tensor:
        trt_type = self._engine.get_tensor_dtype(name)
        dtype = _TORCH_DTYPES.get(trt_type)
        if dtype is None:
            raise ConfigError(name, "model.plan", f"tensor type {trt_type} is not supported")
        return torch.empty(shape, dtype=dtype, device=self._torch_device)

    def _bound(self, name: str, shape: Shape) -> torch.Tensor:
        """This tensor's buffer, viewed at `shape` (grown if a dynamic output outgrows it)."""
        buffer = self._buffers[name]
        count = int(np.prod(shape))
        if count > buffer.numel():
            buffer = self._buffers[name] = self._alloc(name, shape)
        return buffer.view(-1)[:count].view(shape)

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array | None:
        return None if dtype.hasobject else self._staging.view(name, shape, dtype)

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        return self.run_ranked(inputs, output_names, {})[0]

    def run_ranked(
        self,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        rankings: Mapping[str, Ranking],
    ) -> tuple[dict[str, Array], dict[str, Ranked]]:
        stream = self._stream
        with torch.cuda.device(self._torch_device), torch.cuda.stream(stream):
            uploaded = {
                n: self._staging.upload(inputs[n], self._torch_device) for n in self._inputs
            }
            feed = self.stages.apply_inputs(uploaded)
            for name in self._inputs:
                shape = tuple(feed[name].shape)
                self._set_shape(name, shape)  # before the buffer grows for a shape refused
                view = self._bound(name, shape)
                view.copy_(feed[name], non_blocking=True)  # also casts to the engine's type
                self._context.set_tensor_address(name, view.data_ptr())
            outputs: dict[str, torch.Tensor] = {}
            for name in self._outputs:
                outputs[name] = self._bound(name, tuple(self._context.get_tensor_shape(name)))
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise InternalError("TensorRT execute_async_v3 failed")
            outputs = self.stages.apply_outputs(outputs, feed)
            return bring_back(
                outputs, output_names, rankings, self._topk, stream, self._blocking_wait
            )

    def close(self) -> None:
        self._buffers.clear()
        self._staging.clear()
        del self._context
        del self._engine


def _check_profiles(profiles: Mapping[str, Profile], spec: ModelSpec, where: str) -> None:
    """A model.plan built elsewhere may take less than the config promises clients:
    refuse it at load rather than fail every batch that reaches past it."""
    for name, profile in profiles.items():
        if spec.batched and profile.max and profile.max[0] < spec.max_batch_size:
            raise ConfigError(
                where,
                "max_batch_size",
                f"{spec.max_batch_size} exceeds the engine's profile for input '{name}' "
                f"(batches up to {profile.max[0]})",
            )
        text = spec.options.text
        if text is not None and len(profile.max) == 2 and profile.max[1] < text.max_length:
            raise ConfigError(
                where,
                "parameters.tokenizer_max_length",
                f"{text.max_length} tokens exceed the engine's profile for input '{name}' "
                f"(up to {profile.max[1]})",
            )
