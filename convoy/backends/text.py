"""Tokenization in front of a text model, so clients can send strings.

Configured in config.pbtxt `parameters`:
  tokenizer             a tokenizer.json (Hugging Face `tokenizers`) in the version directory
  tokenizer_max_length  truncation length (default 256)
  postprocess           "mean_pool_l2": the runtime returns per-token hidden states
                        [batch, tokens, dim]; they are mean-pooled over real tokens and
                        L2-normalised: by the fused kernel on the runtime's GPU stream
                        where it keeps tensors on a GPU (PyTorch, TensorRT), so only
                        the pooled vectors come back; else here (convoy/kernels/pooling.py)
The model's single BYTES input is tokenized per batch, padded to the longest
item, and fed to the runtime as input_ids / attention_mask (/ token_type_ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from convoy.kernels.pooling import mean_pool_l2_reference

from ..config import ModelSpec, TextOptions
from ..errors import ConfigError, InvalidInput
from .base import Array, Backend
from .stages import DeviceStages, working_kernel


def tokenizer_path(options: TextOptions, version_dir: Path) -> Path:
    """The tokenizer file; checked before the runtime loads (an engine build takes minutes)."""
    path = version_dir / options.tokenizer
    if not path.is_file():
        raise ConfigError(str(path), "parameters.tokenizer", "tokenizer file not found")
    return path


class TokenizingBackend:
    def __init__(
        self,
        inner: Backend,
        spec: ModelSpec,
        version_dir: Path,
        stages: DeviceStages | None = None,
    ) -> None:
        self._inner = inner
        self.device = inner.device
        options = spec.options.text
        assert options is not None  # load_backend wraps only where the config opts in
        path = tokenizer_path(options, version_dir)
        self._text_input = options.input
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.enable_truncation(max_length=options.max_length)
        self._tokenizer.enable_padding()
        self._wants = set(getattr(inner, "input_names", ("input_ids", "attention_mask")))
        self._pool = options.postprocess == "mean_pool_l2"
        if self._pool and stages is not None:
            pool = _device_pooling(stages.device)
            for output in spec.outputs:
                stages.outputs[output.name] = lambda hidden, feed: pool(
                    hidden, feed["attention_mask"]
                )
            self._pool = False

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        texts = inputs[self._text_input]
        try:
            strings = [_text(t) for t in texts.reshape(-1)]
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input '{self._text_input}': not UTF-8 text ({exc})") from None
        encodings = self._tokenizer.encode_batch(strings)
        feed: dict[str, Array] = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if "token_type_ids" in self._wants:
            feed["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        outputs = self._inner.run({k: v for k, v in feed.items() if k in self._wants}, output_names)
        if self._pool:
            mask = feed["attention_mask"]
            outputs = {name: mean_pool_l2_reference(value, mask) for name, value in outputs.items()}
        return outputs

    def close(self) -> None:
        self._inner.close()


def _text(item: object) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item).decode("utf-8")
    raise InvalidInput(f"expected text, got {type(item).__name__}")


def _device_pooling(device: str) -> Any:
    import torch

    from convoy.kernels.pooling import mean_pool_l2_torch

    def load() -> Any:
        from convoy.kernels.triton_kernels import mean_pool_l2_triton

        return mean_pool_l2_triton

    def probe(kernel: Any) -> None:
        kernel(torch.ones((1, 2, 4), device=device), torch.ones((1, 2), device=device))

    return working_kernel("mean_pool_l2", device, load, mean_pool_l2_torch, probe)
