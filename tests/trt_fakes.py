"""A stand-in for the `tensorrt` module and for torch's CUDA device calls, enough to
load, build and run TensorRTBackend on a machine without TensorRT or a GPU. It
records which device was current when each engine object was made."""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch


@dataclass
class Devices:
    """torch.cuda's notion of the current device, per process (as CUDA's is per thread)."""

    current: int = 0
    seen: dict[str, int] = field(default_factory=dict)  # event -> device current then

    def note(self, event: str) -> None:
        self.seen[event] = self.current


class Engine:
    """One input `ids` [batch, -1] INT64 and one output `out` [batch, 4] FLOAT."""

    def __init__(self, devices: Devices, profile: tuple[tuple[int, ...], ...]) -> None:
        self.devices = devices
        self.profile = profile
        self.num_io_tensors = 2

    def get_tensor_name(self, i: int) -> str:
        return ("ids", "out")[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "ids" else "OUTPUT"

    def get_tensor_profile_shape(self, name: str, index: int) -> tuple[tuple[int, ...], ...]:
        return self.profile

    def get_tensor_dtype(self, name: str) -> str:
        return "INT64" if name == "ids" else "FLOAT"

    def create_execution_context(self) -> Context:
        self.devices.note("create_execution_context")
        return Context(self)


class Context:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.executed = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.profile
        if len(shape) != len(low) or not all(
            a <= d <= b for a, d, b in zip(low, shape, high, strict=True)
        ):
            return False  # as TensorRT does, after logging an error
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shapes["ids"][0], 4)

    def set_tensor_address(self, name: str, address: int) -> None:
        pass

    def execute_async_v3(self, stream: int) -> bool:
        self.executed += 1
        return True


def fake_tensorrt(devices: Devices, profile: tuple[tuple[int, ...], ...]) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0"  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            devices.note("deserialize_cuda_engine")
            return Engine(devices, profile)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            devices.note("Builder")

        def create_network(self, flags: int) -> object:
            return object()

        def create_builder_config(self) -> Any:
            return types.SimpleNamespace(set_flag=lambda flag: None, add_optimization_profile=id)

        def create_optimization_profile(self) -> Any:
            return types.SimpleNamespace(set_shape=lambda *args: None)

        def build_serialized_network(self, network: object, config: object) -> bytes:
            devices.note("build_serialized_network")
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: object, logger: Logger) -> None:
            pass

        def parse(self, onnx: bytes) -> bool:
            return True

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]
    trt.IInt8EntropyCalibrator2 = object  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT64="INT64")  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")  # type: ignore[attr-defined]
    return trt


def install(
    monkeypatch: pytest.MonkeyPatch,
    profile: tuple[tuple[int, ...], ...] = ((1, 1), (16, 128), (32, 256)),
) -> tuple[Any, Devices]:
    """convoy.backends.tensorrt imported over the fake TensorRT, with torch's CUDA
    device and memory calls answered on the CPU; returns the module and the devices."""
    devices = Devices()

    class device:  # torch.cuda.device, as torch spells it
        def __init__(self, index: Any) -> None:
            self.index = index if isinstance(index, int) else torch.device(index).index

        def __enter__(self) -> None:
            self.previous, devices.current = devices.current, self.index

        def __exit__(self, *exc: object) -> None:
            devices.current = self.previous

    def set_device(index: Any) -> None:
        devices.current = index if isinstance(index, int) else torch.device(index).index

    real_empty = torch.empty

    def empty(*shape: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("device", None)
        kwargs.pop("pin_memory", None)
        return real_empty(*shape, **kwargs)

    @contextlib.contextmanager
    def stream(s: object) -> Iterator[None]:
        yield

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(devices, profile))
    # Imported afresh over the fake, and forgotten again after the test.
    monkeypatch.setitem(sys.modules, "convoy.backends.tensorrt", types.ModuleType("unset"))
    del sys.modules["convoy.backends.tensorrt"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: devices.current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda d=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch, "empty", empty)
    import convoy.backends.tensorrt as module

    monkeypatch.setattr(module.StagingBuffers, "upload", lambda self, a, d: torch.from_numpy(a))

    def bring_back(outputs: Any, names: Any, rankings: Any, *rest: Any) -> Any:
        return {n: outputs[n].numpy() for n in names}, {}

    monkeypatch.setattr(module, "bring_back", bring_back)
    return module, devices
