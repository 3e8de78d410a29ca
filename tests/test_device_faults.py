"""Which GPU errors are faults of the device, and which of those are fatal to it."""

from __future__ import annotations

import pytest

from convoy.errors import ConfigError, InternalError
from convoy.scheduling.devices import is_device_fault, is_fatal_device_fault

_ASYNC_NOTE = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
    "\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)

# As torch, ONNX Runtime, TensorRT and cuda-python word them.
FATAL = [
    "CUDA error: an illegal memory access was encountered" + _ASYNC_NOTE,
    "CUDA error: device-side assert triggered" + _ASYNC_NOTE,
    "CUDA error: unspecified launch failure" + _ASYNC_NOTE,
    "CUDA error: an illegal instruction was encountered" + _ASYNC_NOTE,
    "CUDA error: misaligned address" + _ASYNC_NOTE,
    "CUDA error: uncorrectable ECC error encountered" + _ASYNC_NOTE,
    "CUDA error: the launch timed out and was terminated" + _ASYNC_NOTE,
    "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was "
    "encountered ; GPU=0 ; hostname=gpu-7 ; file=cuda_call.cc ; line=123 ; "
    "expr=cudaStreamSynchronize(stream);",
    "[TRT] [E] 1: [runner.cpp::execute::1024] Error Code 1: Cuda Runtime "
    "(an illegal memory access was encountered)",
    "CUresult.CUDA_ERROR_ILLEGAL_ADDRESS",
    "cudaError_t.cudaErrorLaunchFailure",
    "Triton Error [CUDA]: an illegal memory access was encountered",
]
NOT_FATAL = [
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.8 GiB "
    "of which 1.2 GiB is free.",
    "CUDA error: out of memory" + _ASYNC_NOTE,
    "CUDA error: invalid argument" + _ASYNC_NOTE,
    "CUDA error: no kernel image is available for execution on the device" + _ASYNC_NOTE,
    "CUDA error: operation not permitted when stream is capturing" + _ASYNC_NOTE,
    "CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx( handle, opa, opb, m, n, k)`",
    "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x",
    "mat1 and mat2 shapes cannot be multiplied (4x3 and 16x16)",
]


@pytest.mark.parametrize("message", FATAL)
def test_sticky_cuda_errors_are_fatal_device_faults(message: str) -> None:
    error = RuntimeError(message)
    assert is_fatal_device_fault(error)
    assert is_device_fault(error)  # fatal is a kind of device fault


@pytest.mark.parametrize("message", NOT_FATAL)
def test_errors_the_context_survives_are_not_fatal(message: str) -> None:
    assert not is_fatal_device_fault(RuntimeError(message))


def test_torch_accelerator_errors_are_device_faults() -> None:
    import torch

    error = torch.AcceleratorError("CUDA error: device-side assert triggered" + _ASYNC_NOTE)
    assert is_device_fault(error) and is_fatal_device_fault(error)
    assert is_device_fault(torch.AcceleratorError("CUDA error: out of memory"))
    assert not is_fatal_device_fault(torch.AcceleratorError("CUDA error: out of memory"))


def test_a_fatal_cause_behind_a_wrapper_counts() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as exc:
            raise InternalError("TensorRT execute_async_v3 failed") from exc
    except InternalError as wrapped:
        assert is_fatal_device_fault(wrapped)
    assert not is_fatal_device_fault(ConfigError("m", "input", "bad dims"))


def test_placement_skips_failed_gpus_and_falls_back_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from convoy.config import InstanceGroupSpec
    from convoy.scheduling import devices

    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    every_gpu = InstanceGroupSpec("g", "KIND_GPU", 2)
    assert devices.place_group("m", every_gpu) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert devices.place_group("m", every_gpu, failed={"cuda:0"}) == ["cuda:1", "cuda:1"]
    assert devices.place_group("m", every_gpu, failed={"cuda:0", "cuda:1"}) == ["cpu", "cpu"]
    pinned = InstanceGroupSpec("g", "KIND_GPU", 1, gpus=(1,))
    assert devices.place_group("m", pinned, failed={"cuda:1"}) == ["cpu"]
    assert devices.place_group("m", pinned, failed={"cuda:0"}) == ["cuda:1"]
