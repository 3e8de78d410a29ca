"""Mean pooling over tokens + L2 normalisation, for sentence-embedding models that
output per-token hidden states (as all-MiniLM-L6-v2 does before pooling)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def mean_pool_l2_reference(
    hidden: npt.NDArray[Any], mask: npt.NDArray[Any], eps: float = 1e-12
) -> npt.NDArray[np.float32]:
    """hidden [B, S, D], mask [B, S] (1 = token) -> unit vectors [B, D]."""
    weights = mask.astype(np.float32)[..., None]
    summed = (hidden.astype(np.float32) * weights).sum(axis=1)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = (pooled / np.maximum(norms, eps)).astype(np.float32)
    return unit


def mean_pool_l2_torch(hidden: Any, mask: Any, eps: float = 1e-12) -> Any:
    """The same in torch ops on tensors on any device (where OpenAI Triton is missing)."""
    import torch

    weights = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2.0, dim=1, eps=eps)
