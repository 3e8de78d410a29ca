"""GPU kernels written in OpenAI Triton, each checked against the numpy reference
beside it (image.py, pooling.py, classify.py in this package). On a machine
without a GPU the tests run them in Triton's interpreter (TRITON_INTERPRET=1) on
CPU tensors."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .classify import topk_torch
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


# One program holds a whole row in registers; wider rows (LLM vocabularies) take torch's path.
MAX_FUSED_WIDTH = 16384


# k is the client's choice per request: left unspecialised, or a first request with
# k == 1 (or a multiple of 16) would compile a new variant on the request path.
# BLOCK, SOFTMAX, the scores' dtype and `width` are fixed per output: model load
# compiles those (convoy/backends/ranking.py, device_topk).
@triton.jit(do_not_specialize=["k"])
def _softmax_topk_kernel(
    scores, values, indices, width, k,
    SOFTMAX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per row: one read of the row, k passes of max/argmax over registers;
    # with SOFTMAX only the k chosen values are turned into probabilities.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(scores + row * width + cols, mask=cols < width, other=float("-inf"))
    x = x.to(tl.float32)
    top = tl.max(x, axis=0)
    total = 1.0
    if SOFTMAX:
        total = tl.sum(tl.exp(x - top), axis=0)  # padding lanes are exp(-inf) = 0
    for j in range(0, k):
        best = tl.max(x, axis=0)
        where = tl.argmax(x, axis=0, tie_break_left=True)
        value = best
        if SOFTMAX:
            value = tl.exp(best - top) / total
        tl.store(values + row * k + j, value)
        tl.store(indices + row * k + j, where.to(tl.int64))
        x = tl.where(cols == where, float("-inf"), x)


def softmax_topk_triton(scores: torch.Tensor, k: int, softmax: bool = False) -> Any:
    """Rows of scores [..., N] -> (values [rows, k] float32, indices [rows, k] int64),
    highest first, ties to the lower index; values are probabilities with `softmax`."""
    flat = scores.reshape(-1, scores.shape[-1]).contiguous()
    rows, width = flat.shape
    k = min(k, width)
    if width > MAX_FUSED_WIDTH:
        return topk_torch(flat, k, softmax)
    values = torch.empty((rows, k), dtype=torch.float32, device=flat.device)
    indices = torch.empty((rows, k), dtype=torch.int64, device=flat.device)
    block = triton.next_power_of_2(width)
    _softmax_topk_kernel[(rows,)](flat, values, indices, width, k, SOFTMAX=softmax, BLOCK=block)
    return values, indices
