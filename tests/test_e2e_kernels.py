"""Models that opt into the kernels through config.pbtxt, end to end."""

from __future__ import annotations

import queue
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tokenizers import Tokenizer

from convoy.kernels.classify import softmax_reference
from convoy.kernels.image import hwc_uint8_to_nchw_reference
from convoy.kernels.pooling import mean_pool_l2_reference

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

RAW_IMAGE_CONFIG = """
name: "image_raw"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_UINT8 dims: [ 64, 64, 3 ] } ]
output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] } ]
parameters { key: "preprocess" value { string_value: "image_hwc_uint8" } }
dynamic_batching { }
"""
SOFTMAX_CONFIG = """
name: "image_softmax"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] } ]
parameters { key: "classification_softmax" value { string_value: "LOGITS" } }
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""
POOLED_CONFIG = """
name: "pooled"
backend: "convoy_python"
max_batch_size: 8
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 3 ] } ]
parameters { key: "tokenizer" value { string_value: "tokenizer.json" } }
parameters { key: "postprocess" value { string_value: "mean_pool_l2" } }
"""
HIDDEN_MODEL = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        ids = inputs["input_ids"].astype(np.float32)
        hidden = np.stack([ids, ids % 7, np.ones_like(ids)], axis=-1)  # [B, S, 3]
        return {"EMBEDDING": hidden}
"""


@pytest.fixture(scope="module")
def kernel_server(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repo = make_repository(tmp_path_factory.mktemp("kernels"), examples_dir, ("image_classifier",))
    (repo / "image_raw" / "1").mkdir(parents=True)
    (repo / "image_raw" / "1" / "model.onnx").symlink_to(
        examples_dir / "image_classifier/1/model.onnx"
    )
    (repo / "image_raw" / "config.pbtxt").write_text(RAW_IMAGE_CONFIG)
    (repo / "image_softmax" / "1").mkdir(parents=True)
    (repo / "image_softmax" / "1" / "model.onnx").symlink_to(
        examples_dir / "image_classifier/1/model.onnx"
    )
    (repo / "image_softmax" / "config.pbtxt").write_text(SOFTMAX_CONFIG)
    (repo / "pooled" / "1").mkdir(parents=True)
    (repo / "pooled" / "1" / "model.py").write_text(HIDDEN_MODEL)
    shutil.copy(
        examples_dir / "minilm_embedding/1/tokenizer.json", repo / "pooled/1/tokenizer.json"
    )
    (repo / "pooled" / "config.pbtxt").write_text(POOLED_CONFIG)
    server = start_server(repo)
    yield server  # type: ignore[misc]
    server.stop()


def test_raw_uint8_images_match_client_side_preprocessing(kernel_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(kernel_server.url)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    raw = grpcclient.InferInput("INPUT", [2, 64, 64, 3], "UINT8")
    raw.set_data_from_numpy(images)
    served = client.infer("image_raw", [raw]).as_numpy("LOGITS")
    floats = grpcclient.InferInput("INPUT", [2, 3, 64, 64], "FP32")
    floats.set_data_from_numpy(hwc_uint8_to_nchw_reference(images))
    expected = client.infer("image_classifier", [floats]).as_numpy("LOGITS")
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    client.close()


def test_mean_pool_postprocess(kernel_server: ServerProcess, examples_dir: Path) -> None:
    texts = [b"a short one", b"and a rather longer sentence for padding"]
    client = grpcclient.InferenceServerClient(kernel_server.url)
    tensor = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t] for t in texts], dtype=object))
    served = client.infer("pooled", [tensor]).as_numpy("EMBEDDING")
    client.close()
    tokenizer = Tokenizer.from_file(str(examples_dir / "minilm_embedding/1/tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch([t.decode() for t in texts])
    ids = np.array([e.ids for e in encodings], np.float32)
    mask = np.array([e.attention_mask for e in encodings])
    hidden = np.stack([ids, ids % 7, np.ones_like(ids)], axis=-1)
    np.testing.assert_allclose(served, mean_pool_l2_reference(hidden, mask), rtol=1e-5)


def test_classification_by_softmax_in_a_batch_of_mixed_asks(kernel_server: ServerProcess) -> None:
    """Concurrent requests batched together: some want top-k probabilities (k differs),
    one wants the raw logits; each gets exactly what it asked for."""
    images = np.random.default_rng(8).random((4, 3, 64, 64), dtype=np.float32)
    results: list[object] = [None] * 4
    answers: queue.Queue[int] = queue.Queue()
    client = grpcclient.InferenceServerClient(kernel_server.url)

    def ask(i: int) -> None:
        tensor = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
        tensor.set_data_from_numpy(images[i : i + 1])
        outputs = [grpcclient.InferRequestedOutput("LOGITS", class_count=i)] if i else None

        def answered(result: object, error: object) -> None:
            results[i] = error or result
            answers.put(i)

        client.async_infer("image_softmax", [tensor], answered, outputs=outputs)

    for i in range(4):
        ask(i)
    assert sorted(answers.get(timeout=30) for _ in range(4)) == [0, 1, 2, 3]
    client.close()
    logits = results[0].as_numpy("LOGITS")  # type: ignore[union-attr]
    assert logits.shape == (1, 1000)
    raw = grpcclient.InferenceServerClient(kernel_server.url)
    for i in (1, 2, 3):
        top = results[i].as_numpy("LOGITS")  # type: ignore[union-attr]
        assert top.shape == (1, i)
        tensor = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
        tensor.set_data_from_numpy(images[i : i + 1])
        row = raw.infer("image_softmax", [tensor]).as_numpy("LOGITS")[0]
        probabilities = softmax_reference(row)
        entries = [item.decode().split(":") for item in top[0]]
        indices = [int(index) for _, index in entries]
        assert indices == list(np.argsort(-row, kind="stable")[:i])
        np.testing.assert_allclose(
            [float(v) for v, _ in entries], probabilities[indices], atol=1e-6
        )
    raw.close()
