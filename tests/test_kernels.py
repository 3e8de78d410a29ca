"""Kernels against their numpy references; GPU parity where a GPU is lent."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from convoy.kernels.classify import format_classes, softmax_reference, topk_reference, topk_torch


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_gpu = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (none on this machine)")


@given(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 50)),
           elements=st.floats(-1e3, 1e3, width=32)),
    st.integers(1, 60),
)  # fmt: skip
def test_topk_matches_a_full_sort(scores: np.ndarray, k: int) -> None:
    values, indices = topk_reference(scores, k)
    kk = min(k, scores.shape[1])
    assert values.shape == indices.shape == (scores.shape[0], kk)
    expected = -np.sort(-scores, axis=1)[:, :kk]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(np.take_along_axis(scores, indices, axis=1), values)


def test_topk_ties_go_to_the_lower_index_and_softmax_keeps_the_order() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]], np.float32)
    values, indices = topk_reference(scores, 3)
    assert indices.tolist() == [[1, 2, 4]] and values.tolist() == [[3.0, 3.0, 3.0]]
    logits = np.random.default_rng(3).standard_normal((4, 10)).astype(np.float32) * 50
    probs, order = topk_reference(logits, 4, softmax=True)
    _, same_order = topk_reference(logits, 4)
    np.testing.assert_array_equal(order, same_order)
    expected = np.take_along_axis(softmax_reference(logits), order, axis=1)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    np.testing.assert_allclose(softmax_reference(logits).sum(axis=1), 1.0, rtol=1e-6)


def test_format_classes_like_triton() -> None:
    values = np.array([[0.7, 0.2], [3.0, 2.0]], np.float32)
    indices = np.array([[1, 2], [0, 2]])
    out = format_classes(values, indices, labels=["cat", "dog", "eel"])
    assert out.shape == (2, 2)
    assert out[0, 0] == b"0.700000:1:dog" and out[0, 1] == b"0.200000:2:eel"
    assert out[1, 0] == b"3.000000:0:cat"
    assert format_classes(values[0], indices[0]).tolist() == [b"0.700000:1", b"0.200000:2"]


@pytest.mark.parametrize("softmax", [False, True])
def test_topk_torch_matches_reference(softmax: bool) -> None:
    import torch

    device = "cuda" if _cuda() else "cpu"
    scores = np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32)
    values, indices = topk_torch(torch.from_numpy(scores).to(device), 5, softmax)
    ref_values, ref_indices = topk_reference(scores, 5, softmax)
    np.testing.assert_allclose(values.cpu().numpy(), ref_values, rtol=1e-5)
    np.testing.assert_array_equal(indices.cpu().numpy(), ref_indices)


def test_image_reference_matches_the_formula() -> None:
    from convoy.kernels.image import hwc_uint8_to_nchw_reference

    images = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = hwc_uint8_to_nchw_reference(images, mean, std)
    assert out.shape == (2, 3, 5, 7) and out.dtype == np.float32
    for c in range(3):
        expected = (images[..., c] / 255.0 - mean[c]) / std[c]
        np.testing.assert_allclose(out[:, c], expected, rtol=1e-5, atol=1e-5)
    assert hwc_uint8_to_nchw_reference(images, dtype=np.float16).dtype == np.float16


def test_pooling_reference_ignores_padding() -> None:
    from convoy.kernels.pooling import mean_pool_l2_reference

    hidden = np.random.default_rng(2).standard_normal((2, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = mean_pool_l2_reference(hidden, mask)
    expected0 = hidden[0, :2].mean(0)
    np.testing.assert_allclose(out[0], expected0 / np.linalg.norm(expected0), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    hidden[0, 2:] = 1e6  # padding positions never leak in
    np.testing.assert_allclose(mean_pool_l2_reference(hidden, mask)[0], out[0], rtol=1e-6)


@pytest.mark.gpu
@needs_gpu
def test_torch_image_and_pooling_on_cuda_match_references() -> None:
    import torch

    from convoy.kernels.image import hwc_uint8_to_nchw_reference, hwc_uint8_to_nchw_torch
    from convoy.kernels.pooling import mean_pool_l2_reference, mean_pool_l2_torch

    images = np.random.default_rng(4).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    gpu_out = hwc_uint8_to_nchw_torch(torch.from_numpy(images).cuda()).cpu().numpy()
    np.testing.assert_allclose(gpu_out, hwc_uint8_to_nchw_reference(images), rtol=1e-5, atol=1e-5)
    hidden = np.random.default_rng(5).standard_normal((4, 16, 384)).astype(np.float32)
    mask = (np.arange(16)[None, :] < np.array([[16], [9], [3], [1]])).astype(np.int64)
    pooled = mean_pool_l2_torch(torch.from_numpy(hidden).cuda(), torch.from_numpy(mask).cuda())
    np.testing.assert_allclose(
        pooled.cpu().numpy(), mean_pool_l2_reference(hidden, mask), atol=1e-5
    )


def _triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


needs_triton = pytest.mark.skipif(not _triton(), reason="OpenAI Triton is not installed")


@needs_triton
def test_triton_image_kernel_matches_reference() -> None:
    import torch

    from convoy.kernels.image import hwc_uint8_to_nchw_reference
    from convoy.kernels.triton_kernels import hwc_uint8_to_nchw_triton

    device = "cuda" if _cuda() else "cpu"  # cpu: Triton's interpreter (conftest sets it)
    images = np.random.default_rng(6).integers(0, 256, (3, 17, 9, 3), dtype=np.uint8)
    out = hwc_uint8_to_nchw_triton(torch.from_numpy(images).to(device)).cpu().numpy()
    np.testing.assert_allclose(out, hwc_uint8_to_nchw_reference(images), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_pooling_kernel_matches_reference() -> None:
    import torch

    from convoy.kernels.pooling import mean_pool_l2_reference
    from convoy.kernels.triton_kernels import mean_pool_l2_triton

    device = "cuda" if _cuda() else "cpu"
    hidden = np.random.default_rng(7).standard_normal((3, 6, 20)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]], dtype=np.int64)
    out = mean_pool_l2_triton(
        torch.from_numpy(hidden).to(device), torch.from_numpy(mask).to(device)
    )
    np.testing.assert_allclose(
        out.cpu().numpy(), mean_pool_l2_reference(hidden, mask), rtol=1e-5, atol=1e-6
    )


@needs_triton
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("width", [7, 1000])
def test_triton_softmax_topk_kernel_matches_reference(softmax: bool, width: int) -> None:
    import torch

    from convoy.kernels.triton_kernels import softmax_topk_triton

    device = "cuda" if _cuda() else "cpu"
    scores = np.random.default_rng(width).standard_normal((5, width)).astype(np.float32) * 4
    scores[0, :3] = scores[0].max() + 1  # a three-way tie at the top
    values, indices = softmax_topk_triton(torch.from_numpy(scores).to(device), 5, softmax)
    ref_values, ref_indices = topk_reference(scores, 5, softmax)
    np.testing.assert_array_equal(indices.cpu().numpy(), ref_indices)
    np.testing.assert_allclose(values.cpu().numpy(), ref_values, rtol=1e-5, atol=1e-7)
    half = torch.from_numpy(scores).to(device).half()  # fp16 logits are ranked in fp32
    _, half_indices = softmax_topk_triton(half, 3, softmax)
    assert half_indices.shape == (5, 3)


def _format_classes_per_element(
    values: np.ndarray, indices: np.ndarray, labels: list[str] | None = None
) -> np.ndarray:
    """format_classes as it was written first, one element at a time: the reference."""
    out = np.empty(values.shape, dtype=np.object_)
    for pos in np.ndindex(values.shape):
        index = int(indices[pos])
        text = f"{float(values[pos]):f}:{index}"
        if labels is not None and 0 <= index < len(labels):
            text += f":{labels[index]}"
        out[pos] = text.encode()
    return out


@pytest.mark.parametrize("scale", [1e-7, 1.0, 1e4, 1e13, 1e30])
@pytest.mark.parametrize("shape", [(64, 10), (7,), (3, 4, 5), (0, 3)])
def test_format_classes_is_byte_identical_to_formatting_each_element(
    scale: float, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(int(scale) % 1000 + len(shape))
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    if values.size >= 7:
        flat = values.reshape(-1)
        flat[:7] = [np.inf, -np.inf, np.nan, -0.0, 0.0, 5e-7, -2.5e-6]  # edge formatting
    indices = rng.integers(-3, 1200, shape)  # some without a label, some negative
    if indices.size > 8:
        indices.reshape(-1)[7:9] = [1000, 1001]  # labels holding "\n" and ":"
    labels = [f"class {i} é" if i % 97 else "" for i in range(1000)] + ["a\nb", "x:y"]
    for table in (None, labels):
        expected = _format_classes_per_element(values, indices, table)
        got = format_classes(values, indices, table)
        assert got.shape == expected.shape and got.dtype == np.object_
        assert got.tolist() == expected.tolist()
    half = values.astype(np.float16)
    assert (
        format_classes(half, indices).tolist()
        == _format_classes_per_element(half, indices).tolist()
    )
