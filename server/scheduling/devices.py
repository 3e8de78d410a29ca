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
