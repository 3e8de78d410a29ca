"""HTTP/REST through the real server: tritonclient.http and gRPC answer alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http_server(
    examples_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repo = make_repository(
        tmp_path_factory.mktemp("http"), examples_dir, ("tiny", "image_classifier")
    )
    proc = start_server(repo)
    yield proc
    proc.stop()


def test_http_and_grpc_give_the_same_answers(http_server: ServerProcess) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    assert http_server.http_port is not None
    x = np.random.default_rng(1).random((2, 16), dtype=np.float32)
    h = httpclient.InferenceServerClient(http_server.http_url)
    g = grpcclient.InferenceServerClient(http_server.url)
    try:
        assert h.is_server_ready() and h.is_model_ready("tiny")
        answers = []
        for binary in (True, False):
            t = httpclient.InferInput("INPUT0", [2, 16], "FP32")
            t.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
            answers.append(h.infer("tiny", [t], outputs=[out]).as_numpy("OUTPUT0"))
        gt = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
        gt.set_data_from_numpy(x)
        expected = g.infer("tiny", [gt]).as_numpy("OUTPUT0")
        for answer in answers:
            np.testing.assert_allclose(answer, expected, rtol=1e-6)
        image = np.random.default_rng(2).random((1, 3, 64, 64), dtype=np.float32)
        hi = httpclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
        hi.set_data_from_numpy(image)
        top = h.infer(
            "image_classifier",
            [hi],
            outputs=[httpclient.InferRequestedOutput("LOGITS", class_count=3)],
        ).as_numpy("LOGITS")
        gi = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
        gi.set_data_from_numpy(image)
        gtop = g.infer(
            "image_classifier",
            [gi],
            outputs=[grpcclient.InferRequestedOutput("LOGITS", class_count=3)],
        ).as_numpy("LOGITS")
        assert top.tolist() == gtop.tolist()
    finally:
        h.close()
        g.close()
