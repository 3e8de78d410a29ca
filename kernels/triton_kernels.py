"""GPU kernels written in OpenAI Triton, each checked against the numpy reference
beside it (kernels/image.py, kernels/pooling.py). On a machine without a GPU the
tests run them in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .image import IMAGENET_MEAN, IMAGENET_STD


@triton.jit
def _hwc_to_nchw_kernel(
    src, dst, pixels_per_image, total_pixels,
    m0, m1, m2, s0, s1, s2,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One program normalises BLOCK pixels (all 3 channels): one read of each uint8
    # pixel, three float stores into the channel planes.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total_pixels
    image = offs // pixels_per_image
    within = offs % pixels_per_image
    base = image * 3 * pixels_per_image + within
    r = tl.load(src + offs * 3 + 0, mask=valid).to(tl.float32)
    g = tl.load(src + offs * 3 + 1, mask=valid).to(tl.float32)
    b = tl.load(src + offs * 3 + 2, mask=valid).to(tl.float32)
    tl.store(dst + base, (r - m0) / s0, mask=valid)
    tl.store(dst + base + pixels_per_image, (g - m1) / s1, mask=valid)
    tl.store(dst + base + 2 * pixels_per_image, (b - m2) / s2, mask=valid)


def hwc_uint8_to_nchw_triton(
    images: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] of (x / 255 - mean) / std."""
    assert images.dtype == torch.uint8 and images.shape[-1] == 3
    images = images.contiguous()
    batch, height, width, _ = images.shape
    out = torch.empty((batch, 3, height, width), dtype=torch.float32, device=images.device)
    total = batch * height * width
    block = 1024
    shift = [m * 255.0 for m in mean]
    scale = [s * 255.0 for s in std]
    grid = (triton.cdiv(total, block),)
    _hwc_to_nchw_kernel[grid](images, out, height * width, total, *shift, *scale, BLOCK=block)
    return out


@triton.jit
def _mean_pool_l2_kernel(
    hidden, mask, out, tokens, dim, eps,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per sequence: masked sum over tokens, mean, then L2 normalisation.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_dim = cols < dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    count = 0.0
    for t in range(0, tokens):
        weight = tl.load(mask + row * tokens + t).to(tl.float32)
        values = tl.load(hidden + (row * tokens + t) * dim + cols, mask=in_dim, other=0.0)
        acc += values.to(tl.float32) * weight
        count += weight
    mean = acc / tl.maximum(count, 1e-9)
    norm = tl.sqrt(tl.sum(mean * mean, axis=0))
    tl.store(out + row * dim + cols, mean / tl.maximum(norm, eps), mask=in_dim)


def mean_pool_l2_triton(hidden: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12) -> Any:
    """hidden [B, S, D], mask [B, S] -> unit vectors [B, D] (float32)."""
    hidden = hidden.contiguous()
    mask = mask.contiguous()
    batch, tokens, dim = hidden.shape
    out = torch.empty((batch, dim), dtype=torch.float32, device=hidden.device)
    block = triton.next_power_of_2(dim)
    _mean_pool_l2_kernel[(batch,)](hidden, mask, out, tokens, dim, eps, BLOCK_D=block)
    return out
