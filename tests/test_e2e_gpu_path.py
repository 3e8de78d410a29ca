"""A model that opts into everything around it, through the stock client, on
KIND_GPU instances: where a GPU is lent this is the whole GPU path (pinned
staging, the image kernel as an input stage, the model on CUDA streams, the fused
softmax + top-k on the device); on CI's CPUs the same test proves the fallback
(KIND_GPU served on the CPU, the numpy references instead of the kernels)."""

from __future__ import annotations

import queue
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from convoy.kernels.classify import topk_reference
from convoy.kernels.image import hwc_uint8_to_nchw_reference
from convoy.scheduling.devices import cuda_device_count

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e

CONFIG = """
name: "vision"
platform: "pytorch_libtorch"
max_batch_size: 16
input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ 16, 16, 3 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 10 ] } ]
parameters { key: "preprocess" value { string_value: "image_hwc_uint8" } }
parameters { key: "classification_softmax" value { string_value: "SCORES" } }
dynamic_batching { max_queue_delay_microseconds: 20000 }
instance_group [ { count: 2 kind: KIND_GPU } ]
"""


class Vision(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.head = torch.nn.Linear(4 * 7 * 7, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).flatten(1))


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Vision]]:
    repo = tmp_path_factory.mktemp("gpu-path")
    (repo / "vision" / "1").mkdir(parents=True)
    (repo / "vision" / "config.pbtxt").write_text(CONFIG)
    module = Vision().eval()
    torch.jit.script(module).save(str(repo / "vision/1/model.pt"))
    server = start_server(repo)
    yield server, module
    server.stop()


def _reference(module: Vision, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(hwc_uint8_to_nchw_reference(images))).numpy()  # type: ignore[no-any-return]


def test_raw_images_and_softmax_classification_in_one_batch(
    vision: tuple[ServerProcess, Vision],
) -> None:
    server, module = vision
    images = np.random.default_rng(11).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    expected = _reference(module, images)
    answers: queue.Queue[tuple[int, object]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(6):  # concurrent: batched together, half of them asking for top-3 only
        tensor = grpcclient.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
        tensor.set_data_from_numpy(images[i : i + 1])
        outputs = [grpcclient.InferRequestedOutput("SCORES", class_count=3)] if i % 2 else None
        client.async_infer(
            "vision",
            [tensor],
            lambda result, error, i=i: answers.put((i, error or result)),
            outputs=outputs,
        )
    results = dict(answers.get(timeout=60) for _ in range(6))
    client.close()
    for i in range(6):
        served = results[i].as_numpy("SCORES")  # type: ignore[attr-defined]
        if i % 2 == 0:
            np.testing.assert_allclose(served[0], expected[i], rtol=1e-3, atol=1e-4)
            continue
        values, indices = topk_reference(expected[i : i + 1], 3, softmax=True)
        entries = [item.decode().split(":") for item in served[0]]
        assert [int(index) for _, index in entries] == indices[0].tolist()
        np.testing.assert_allclose([float(v) for v, _ in entries], values[0], atol=1e-4)


def test_metrics_say_where_the_batches_ran(vision: tuple[ServerProcess, Vision]) -> None:
    server, _ = vision
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
    client.infer("vision", [tensor])
    client.close()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    device = "cuda:0" if cuda_device_count() else "cpu"
    assert f'convoy_compute_seconds_count{{device="{device}",model="vision"' in body.decode()
