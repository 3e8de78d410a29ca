"""Device placement for instance groups, with CPU fallback where no GPU serves."""

from __future__ import annotations

import functools
import logging

from ..config import InstanceGroupSpec

log = logging.getLogger(__name__)


@functools.cache
def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


def place_group(model: str, group: InstanceGroupSpec) -> list[str]:
    """One device string per instance of the group ("cpu" or "cuda:N")."""
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
    indices = [g for g in group.gpus if 0 <= g < gpus] or list(range(gpus))
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
    if name in ("OutOfMemoryError", "CudaError", "CUDARuntimeError"):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _DEVICE_MARKERS)
