"""Device placement for instance groups, with CPU fallback where no GPU serves."""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass

from ..config import InstanceGroupSpec

log = logging.getLogger(__name__)


@functools.cache
def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class GpuReading:
    """One GPU as this process sees it, read when metrics are scraped."""

    index: int
    name: str
    used_bytes: int  # by every process on the device
    total_bytes: int
    reserved_bytes: int  # by this process's torch allocator
    utilization: float | None  # 0..1 over NVML's last sample; None without NVML


def gpu_readings() -> list[GpuReading]:
    """The GPUs this process already computes on. Others are left alone: asking
    them would create a CUDA context (hundreds of MB) on each."""
    if cuda_device_count() == 0:
        return []
    import torch

    if not torch.cuda.is_initialized():
        return []
    readings = []
    for index in range(torch.cuda.device_count()):
        reserved = int(torch.cuda.memory_reserved(index))
        if reserved == 0:
            continue
        free, total = torch.cuda.mem_get_info(index)
        try:
            utilization: float | None = torch.cuda.utilization(index) / 100
        except Exception:  # NVML (nvidia-ml-py) absent or not answering
            utilization = None
        readings.append(
            GpuReading(
                index, torch.cuda.get_device_name(index), total - free, total, reserved, utilization
            )
        )
    return readings


def resolved_kind(group: InstanceGroupSpec) -> tuple[str, tuple[int, ...]]:
    """KIND_AUTO made concrete, as Triton shows it in a served config: the kind and
    the GPUs the group runs on (KIND_GPU without a GPU stays what it asked for)."""
    gpus = cuda_device_count()
    kind = group.kind
    if kind == "KIND_AUTO":
        kind = "KIND_GPU" if gpus else "KIND_CPU"
    if kind == "KIND_GPU" and gpus and not group.gpus:
        return kind, tuple(range(gpus))
    return kind, group.gpus


def place_group(model: str, group: InstanceGroupSpec, failed: Collection[str] = ()) -> list[str]:
    """One device string per instance of the group ("cpu" or "cuda:N"). GPUs in
    `failed` (lost to a fatal fault: their CUDA context is poisoned) are skipped;
    where that leaves none, the group serves on the CPU, as without a GPU."""
    gpus = cuda_device_count()
    if group.kind == "KIND_CPU":
        return ["cpu"] * group.count
    if gpus == 0:
        if group.kind == "KIND_GPU":
            log.warning(
                "model '%s' instance group '%s' asks for KIND_GPU but no GPU is usable here: "
                "serving on the CPU",
                model,
                group.name,
            )
        return ["cpu"] * group.count
    listed = [g for g in group.gpus if 0 <= g < gpus] or list(range(gpus))
    indices = [g for g in listed if f"cuda:{g}" not in failed]
    if not indices:
        log.warning(
            "model '%s' instance group '%s': its GPUs failed (%s): serving on the CPU",
            model,
            group.name,
            ", ".join(f"cuda:{g}" for g in listed),
        )
        return ["cpu"] * group.count
    # Triton places `count` instances on *each* listed GPU.
    return [f"cuda:{g}" for g in indices for _ in range(group.count)]


_DEVICE_MARKERS = (
    "cuda error",
    "cuda out of memory",
    "cudaerror",
    "cuda failure",
    "cublas_status",
    "cudnn_status",
    "device-side assert",
    "an illegal memory access",
    "cuda_error_",
)


def is_device_fault(error: BaseException) -> bool:
    """Whether an exception from a GPU instance means the device (not the input) failed.

    Runtimes report device trouble as plain RuntimeErrors (torch, ONNX Runtime,
    cuda-python); their messages carry the CUDA wording matched here.
    """
    name = type(error).__name__
    if name in ("OutOfMemoryError", "CudaError", "CUDARuntimeError", "AcceleratorError"):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _DEVICE_MARKERS) or is_fatal_device_fault(error)


# CUDA's "sticky" errors: after one, every later call in the process's context fails
# the same way, so only a new process recovers. Runtime wording (torch, ONNX Runtime,
# TensorRT quote cudaGetErrorString), then the driver's and runtime's enum names
# (cuda-python, some TensorRT logs). Out of memory and invalid arguments are absent
# on purpose: the context survives them.
_FATAL_MARKERS = (
    "an illegal memory access was encountered",  # 700 cudaErrorIllegalAddress
    "device-side assert triggered",  # 710 cudaErrorAssert
    "unspecified launch failure",  # 719 cudaErrorLaunchFailure
    "an illegal instruction was encountered",  # 715 cudaErrorIllegalInstruction
    "misaligned address",  # 716 cudaErrorMisalignedAddress
    "invalid program counter",  # 718 cudaErrorInvalidPc
    "operation not supported on global/shared address space",  # 717
    "hardware stack error",  # 714 cudaErrorHardwareStackError
    "the launch timed out and was terminated",  # 702 cudaErrorLaunchTimeout
    "uncorrectable ecc error encountered",  # 214 cudaErrorECCUncorrectable
    "uncorrectable nvlink error",  # 220 cudaErrorNvlinkUncorrectable
    "cuda_error_illegal_address",
    "cuda_error_assert",
    "cuda_error_launch_failed",
    "cuda_error_illegal_instruction",
    "cuda_error_misaligned_address",
    "cuda_error_invalid_pc",
    "cuda_error_invalid_address_space",
    "cuda_error_hardware_stack_error",
    "cuda_error_launch_timeout",
    "cuda_error_ecc_uncorrectable",
    "cuda_error_nvlink_uncorrectable",
    "cudaerrorillegaladdress",
    "cudaerrorassert",
    "cudaerrorlaunchfailure",
    "cudaerrorillegalinstruction",
    "cudaerrormisalignedaddress",
    "cudaerrorinvalidpc",
    "cudaerrorinvalidaddressspace",
    "cudaerrorhardwarestackerror",
    "cudaerrorlaunchtimeout",
    "cudaerroreccuncorrectable",
    "cudaerrornvlinkuncorrectable",
)


def is_fatal_device_fault(error: BaseException) -> bool:
    """Whether an exception from a GPU instance means its device is lost to this process.

    These errors poison the process's CUDA context on that device: every later
    launch there fails too, so probing it again only fails real batches. The
    exception's causes are searched as well, since wrappers re-raise with `from`.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if any(marker in text for marker in _FATAL_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False
