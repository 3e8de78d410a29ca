"""The fused top-k kernel is compiled at model load for every output a request may
rank, so no request pays for a compile (Triton's interpreter on the CPU here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convoy.backends.ranking import RankedRows, device_topk, ranked_rows
from convoy.config import read_model_config, validate_model_config
from convoy.scheduling.devices import cuda_device_count
from convoy.tensors import Ranking

pytest.importorskip("triton", reason="OpenAI Triton is not installed")

CONFIG = """
name: "c"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] },
         { name: "GRID" data_type: TYPE_FP16 dims: [ 2, 3 ] },
         { name: "TOKENS" data_type: TYPE_FP32 dims: [ -1, 8 ] },
         { name: "NAMES" data_type: TYPE_STRING dims: [ 1 ] } ]
parameters { key: "classification_softmax" value { string_value: "LOGITS" } }
"""


def spec_of(tmp_path: Path, text: str = CONFIG):  # type: ignore[no-untyped-def]
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c/config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(tmp_path / "c"), "c/config.pbtxt", "c")


def test_the_rows_a_request_may_rank_come_from_the_outputs(tmp_path: Path) -> None:
    # TOKENS has no fixed width and NAMES is text: nothing to compile in advance.
    assert ranked_rows(spec_of(tmp_path)) == (RankedRows(6, False), RankedRows(1000, True))
    unbatched = spec_of(tmp_path, CONFIG.replace("max_batch_size: 8", "max_batch_size: 0"))
    assert RankedRows(6, False) in ranked_rows(unbatched)  # the whole tensor is one row


def test_load_launches_the_kernel_for_each_width_dtype_and_softmax(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convoy.kernels import triton_kernels

    launched: list[tuple[int, bool, Any]] = []
    real = triton_kernels.softmax_topk_triton

    def recording(scores: torch.Tensor, k: int, softmax: bool = False) -> Any:
        launched.append((int(scores.shape[-1]), softmax, scores.dtype))
        return real(scores, k, softmax)

    monkeypatch.setattr(triton_kernels, "softmax_topk_triton", recording)
    topk = device_topk("cpu", ranked_rows(spec_of(tmp_path)), [torch.float16])
    assert topk is recording  # the kernel ran everywhere it was tried: it is the one used
    for dtype in (torch.float32, torch.float16):
        assert (1000, True, dtype) in launched and (6, False, dtype) in launched
    scores = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1000)).astype("f4"))
    _, indices = topk(scores, 5, True)
    assert indices.tolist() == torch.topk(scores, 5).indices.tolist()


def test_a_width_that_fails_to_compile_falls_back_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convoy.kernels import triton_kernels
    from convoy.kernels.classify import topk_torch

    def fails_wide(scores: torch.Tensor, k: int, softmax: bool = False) -> Any:
        if scores.shape[-1] > 100:
            raise RuntimeError("out of resource: shared memory")
        return topk_torch(scores, k, softmax)

    monkeypatch.setattr(triton_kernels, "softmax_topk_triton", fails_wide)
    assert device_topk("cpu", ranked_rows(spec_of(tmp_path))) is topk_torch


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_no_ranked_request_compiles_after_load(small_examples: Path, precision: str) -> None:
    from convoy.backends.pytorch import TorchScriptBackend
    from convoy.kernels import triton_kernels

    config = read_model_config(small_examples / "tiny")
    config.parameters["precision"].string_value = precision
    spec = validate_model_config(config, "tiny/config.pbtxt", "tiny")
    backend = TorchScriptBackend(small_examples / "tiny/1/model.pt", "cuda:0", spec)
    caches = triton_kernels._softmax_topk_kernel.device_caches
    compiled = sum(len(c[0]) for c in caches.values())
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    for k in (1, 5, 16):
        _, ranked = backend.run_ranked({"INPUT0": x}, [], {"OUTPUT0": Ranking(k, False, True)})
        assert ranked["OUTPUT0"].indices.shape == (3, k)
    assert sum(len(c[0]) for c in caches.values()) == compiled
    backend.close()
