"""The work around the model as device stages of a PyTorch backend.

On a GPU instance the image conversion and the pooling run as Triton kernels on
the instance's stream (the cuda:0 cases, where a GPU is lent); on the CPU the
same registration and plumbing run on CPU tensors (the kernels in Triton's
interpreter). Either way they must give what the numpy reference wrappers give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convoy.backends.preprocess import ImagePreprocessingBackend, with_image_preprocessing
from convoy.backends.pytorch import TorchScriptBackend
from convoy.backends.stages import device_stages
from convoy.backends.text import TokenizingBackend
from convoy.config import ModelSpec, read_model_config, validate_model_config
from convoy.scheduling.devices import cuda_device_count
from convoy.tensors import Ranking

pytest.importorskip("triton", reason="OpenAI Triton is not installed")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda:0",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none here)"),
        ],
    ),
]


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).flatten(1)


class Hidden(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.float()
        return torch.stack([ids, ids % 7, torch.ones_like(ids)], dim=-1)  # [B, S, 3]


IMAGE_CONFIG = """
name: "img"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT" data_type: TYPE_UINT8 dims: [ 8, 8, 3 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 144 ] } ]
parameters { key: "preprocess" value { string_value: "image_hwc_uint8" } }
parameters { key: "preprocess_mean" value { string_value: "0.5,0.4,0.3" } }
"""
TEXT_CONFIG = """
name: "text"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 3 ] } ]
parameters { key: "tokenizer" value { string_value: "tokenizer.json" } }
parameters { key: "postprocess" value { string_value: "mean_pool_l2" } }
"""


def word_tokenizer(path: Path) -> None:
    """A small whitespace tokenizer with padding, written as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "a short one and rather longer sentence for padding".split()
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def model(tmp: Path, config: str, module: torch.nn.Module) -> tuple[ModelSpec, Path]:
    (tmp / "1").mkdir(parents=True)
    (tmp / "config.pbtxt").write_text(config)
    torch.jit.script(module).save(str(tmp / "1/model.pt"))
    spec = validate_model_config(read_model_config(tmp), str(tmp), tmp.name)
    return spec, tmp / "1/model.pt"


@pytest.mark.parametrize("device", DEVICES)
def test_image_conversion_as_an_input_stage(tmp_path: Path, device: str) -> None:
    spec, path = model(tmp_path / "img", IMAGE_CONFIG, Classifier())
    host = with_image_preprocessing(TorchScriptBackend(path, device, spec), spec, None)
    assert isinstance(host, ImagePreprocessingBackend)
    runtime = TorchScriptBackend(path, device, spec)
    # What load_backend registers on: a GPU instance's stages; a CPU one keeps numpy.
    assert (device_stages(runtime) is None) == (device == "cpu")
    staged = with_image_preprocessing(runtime, spec, runtime.stages)
    assert staged is runtime and "INPUT" in runtime.stages.inputs
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    expected = host.run({"INPUT": images}, ["OUT"])["OUT"]
    got = staged.run({"INPUT": images}, ["OUT"])["OUT"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_pooling_as_an_output_stage(tmp_path: Path, device: str) -> None:
    spec, path = model(tmp_path / "text", TEXT_CONFIG, Hidden())
    word_tokenizer(path.parent / "tokenizer.json")
    host = TokenizingBackend(TorchScriptBackend(path, device, spec), spec, path.parent)
    runtime = TorchScriptBackend(path, device, spec)
    assert runtime.input_names == ("input_ids", "attention_mask")  # forward()'s own names
    staged = TokenizingBackend(runtime, spec, path.parent, runtime.stages)
    assert "EMBEDDING" in runtime.stages.outputs
    texts = np.array([[b"a short one"], [b"and a rather longer sentence for padding"]], object)
    expected = host.run({"TEXT": texts}, ["EMBEDDING"])["EMBEDDING"]
    got = staged.run({"TEXT": texts}, ["EMBEDDING"])["EMBEDDING"]
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ranking_beside_the_full_outputs(tmp_path: Path, device: str) -> None:
    spec, path = model(tmp_path / "img", IMAGE_CONFIG, Classifier())
    runtime = TorchScriptBackend(path, device, spec)
    with_image_preprocessing(runtime, spec, runtime.stages)
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    full = runtime.run({"INPUT": images}, ["OUT"])["OUT"]
    outputs, ranked = runtime.run_ranked({"INPUT": images}, [], {"OUT": Ranking(3, True, True)})
    assert outputs == {}
    np.testing.assert_array_equal(ranked["OUT"].indices, np.argsort(-full, axis=1)[:, :3])
    probabilities = np.exp(full - full.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(ranked["OUT"].values, -np.sort(-probabilities)[:, :3], rtol=1e-5)


def test_a_triton_kernel_that_cannot_run_here_gives_way_to_torch_ops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from convoy.backends.stages import working_kernel

    def triton_kernel(x: object) -> object:
        return x

    def torch_ops(x: object) -> object:
        return x

    def fails_to_compile(kernel: object) -> None:
        raise RuntimeError("Failed to find C compiler")

    def missing() -> object:
        raise ImportError("no module named triton")

    assert (
        working_kernel("k", "cpu", lambda: triton_kernel, torch_ops, lambda k: None)
        is triton_kernel
    )
    with caplog.at_level("WARNING"):
        assert (
            working_kernel("k", "cpu", lambda: triton_kernel, torch_ops, fails_to_compile)
            is torch_ops
        )
        assert working_kernel("k", "cpu", missing, torch_ops, lambda k: None) is torch_ops
    assert "C compiler" in caplog.text and "no module named triton" in caplog.text
