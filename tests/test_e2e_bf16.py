"""BF16 tensors end to end: raw bfloat16 bytes through the stock tritonclient into a
TorchScript model computing in bfloat16 and back; refused for runtimes that cannot.
Over HTTP/REST, JSON 'data' carries BF16 as numbers both ways."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


CONFIG = """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_BF16 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_BF16 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bf16") / "repo"
    model = root / "bf16"
    (model / "1").mkdir(parents=True)
    torch.jit.script(Double()).save(str(model / "1" / "model.pt"))
    (model / "config.pbtxt").write_text('name: "bf16"\n' + CONFIG)
    onnx = root / "bf16_onnx"
    (onnx / "1").mkdir(parents=True)
    (onnx / "config.pbtxt").write_text(
        'name: "bf16_onnx"\n' + CONFIG.replace("pytorch_libtorch", "onnxruntime_onnx")
    )
    server = start_server(root)
    yield server
    server.stop()


def _doubled_by_torch(x: np.ndarray) -> np.ndarray:
    # The client's float32 rounded to bfloat16 by torch (nearest even), doubled in bfloat16.
    return (torch.from_numpy(x).to(torch.bfloat16) * 2).float().numpy()


def test_bf16_in_and_out(bf16_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(bf16_server.url)
    try:
        x = np.array([[1.5, -2.25, 3.0, 1e-3]], np.float32)
        tensor = grpcclient.InferInput("X", [1, 4], "BF16")
        tensor.set_data_from_numpy(x)
        result = client.infer("bf16", [tensor])
        assert result.get_output("Y").datatype == "BF16"
        np.testing.assert_array_equal(result.as_numpy("Y"), _doubled_by_torch(x))
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["bf16_onnx"]["state"] == "UNAVAILABLE"
        assert "TYPE_BF16 needs a backend" in index["bf16_onnx"]["reason"]
    finally:
        client.close()


# Negative values, fractions bfloat16 cannot hold (rounded), exact halfway cases (ties to
# even: 1 + 2^-8 rounds down to 1.0, 1 + 3 * 2^-8 up to 1.015625), and integers.
BF16_VALUES = [
    [1.5, -2.25, 3.0, 1e-3],
    [-0.1, 1 / 3, -65504.7, 3.140625],
    [1.00390625, 1.01171875, -1.00390625, -1.01171875],
    [-3, 0, 7, -0.0],
]


def test_bf16_json_data_is_numbers_over_http(bf16_server: ServerProcess) -> None:
    """A curl-style JSON request: BF16 'data' is numbers in, numbers out, rounded as
    torch rounds float32 to bfloat16."""
    body = json.dumps(
        {"inputs": [{"name": "X", "shape": [4, 4], "datatype": "BF16", "data": BF16_VALUES}]}
    )
    connection = http.client.HTTPConnection("127.0.0.1", bf16_server.http_port, timeout=30)
    try:
        connection.request("POST", "/v2/models/bf16/infer", body=body)
        response = connection.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["datatype"] == "BF16" and output["shape"] == [4, 4]
    assert all(type(v) is float for v in output["data"])
    expected = _doubled_by_torch(np.array(BF16_VALUES, np.float32))
    np.testing.assert_array_equal(np.array(output["data"], np.float32), expected.reshape(-1))
    # The rounding is torch's, not truncation: 1/3 -> 0.333984375, doubled.
    assert output["data"][5] == 0.66796875


@pytest.mark.parametrize("binary_output", [True, False])
def test_bf16_binary_data_over_http(bf16_server: ServerProcess, binary_output: bool) -> None:
    """tritonclient.http sends BF16 as binary data (it refuses JSON for BF16); the
    answer as binary data or as JSON numbers reads back the same."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(bf16_server.http_url)
    try:
        # tritonclient truncates float32 to bfloat16 (the top 16 bits); values bfloat16
        # holds exactly read the same however they are rounded.
        x = torch.tensor(BF16_VALUES).to(torch.bfloat16).float().numpy()
        tensor = httpclient.InferInput("X", [4, 4], "BF16")
        tensor.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("Y", binary_data=binary_output)
        result = client.infer("bf16", [tensor], outputs=[out])
        np.testing.assert_array_equal(
            np.asarray(result.as_numpy("Y"), np.float32), _doubled_by_torch(x)
        )
    finally:
        client.close()
