"""A Triton repository as people write it from Triton's documentation: a python-backend
pre-processing model, an ONNX model, and an ensemble chaining them, loaded unchanged and
asked through both tritonclient.grpc and tritonclient.http."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from loadtests.triton_pipeline import write_pipeline

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("triton"), examples_dir, ("image_classifier",))
    write_pipeline(repo)
    proc = start_server(repo)
    yield proc
    proc.stop()


def test_the_documented_pipeline_answers_the_same_over_grpc_and_http(
    served: ServerProcess,
) -> None:
    images = np.random.default_rng(7).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    # What the pipeline must equal: pre-processing by hand, then the ONNX model alone.
    direct = grpcclient.InferenceServerClient(served.url)
    pixels = (images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    tensor = grpcclient.InferInput("INPUT", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(pixels))
    expected = direct.infer("image_classifier", [tensor]).as_numpy("LOGITS")

    image = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
    image.set_data_from_numpy(images)
    over_grpc = direct.infer("classify", [image]).as_numpy("LOGITS")
    direct.close()

    http = httpclient.InferenceServerClient(served.http_url)
    assert http.is_model_ready("classify") and http.is_model_ready("preprocess")
    binary = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    binary.set_data_from_numpy(images, binary_data=True)
    over_http = http.infer("classify", [binary]).as_numpy("LOGITS")
    as_json = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    as_json.set_data_from_numpy(images, binary_data=False)
    over_json = http.infer("classify", [as_json]).as_numpy("LOGITS")
    top = http.infer(
        "classify",
        [binary],
        outputs=[httpclient.InferRequestedOutput("LOGITS", class_count=3)],
    ).as_numpy("LOGITS")
    http.close()

    for answer in (over_grpc, over_http, over_json):
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
    best = int(np.argmax(expected[0]))
    assert top.shape == (2, 3) and top[0, 0].decode().split(":")[1] == str(best)
