"""Image pre-processing: uint8 HWC images -> normalised float NCHW, so clients can
send raw pixels (4x smaller on the wire than FP32) and the server converts them."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hwc_uint8_to_nchw_reference(
    images: npt.NDArray[np.uint8],
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: type[np.floating[Any]] = np.float32,
) -> npt.NDArray[Any]:
    """[B, H, W, C] uint8 -> [B, C, H, W] of (x / 255 - mean) / std."""
    scale = np.asarray(std, dtype=np.float32) * 255.0
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    out = (images.astype(np.float32) - shift) / scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).astype(dtype, copy=False)


def hwc_uint8_to_nchw_torch(
    images: Any,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    half: bool = False,
) -> Any:
    """The same in torch ops on a uint8 tensor on any device (where OpenAI Triton is
    missing): one elementwise pass and a permute."""
    import torch

    assert isinstance(images, torch.Tensor)
    scale = torch.tensor(std, device=images.device) * 255.0
    shift = torch.tensor(mean, device=images.device) * 255.0
    out = ((images.float() - shift) / scale).permute(0, 3, 1, 2).contiguous()
    return out.half() if half else out
