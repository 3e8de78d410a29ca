"""BF16 tensors end to end: raw bfloat16 bytes through the stock tritonclient into a
TorchScript model computing in bfloat16 and back; refused for runtimes that cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from .conftest import start_server

pytestmark = pytest.mark.e2e


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_bf16_in_and_out(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "bf16"
    (model / "1").mkdir(parents=True)
    torch.jit.script(Double()).save(str(model / "1" / "model.pt"))
    config = """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_BF16 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_BF16 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""
    (model / "config.pbtxt").write_text('name: "bf16"\n' + config)
    onnx = tmp_path / "repo" / "bf16_onnx"
    (onnx / "1").mkdir(parents=True)
    (onnx / "config.pbtxt").write_text(
        'name: "bf16_onnx"\n' + config.replace("pytorch_libtorch", "onnxruntime_onnx")
    )
    server = start_server(tmp_path / "repo")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        x = np.array([[1.5, -2.25, 3.0, 1e-3]], np.float32)
        tensor = grpcclient.InferInput("X", [1, 4], "BF16")
        tensor.set_data_from_numpy(x)
        result = client.infer("bf16", [tensor])
        assert result.get_output("Y").datatype == "BF16"
        expected = (torch.from_numpy(x).to(torch.bfloat16) * 2).float().numpy()
        np.testing.assert_array_equal(result.as_numpy("Y"), expected)
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["bf16_onnx"]["state"] == "UNAVAILABLE"
        assert "TYPE_BF16 needs a backend" in index["bf16_onnx"]["reason"]
        client.close()
    finally:
        server.stop()
