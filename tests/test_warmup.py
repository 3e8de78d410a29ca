"""Triton's model_warmup: parsed and checked with the config, run on every instance
at load; a failing sample fails the load with the sample named."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from convoy.config import read_model_config, validate_model_config
from convoy.errors import ConfigError
from convoy.repository.warmup import sample_inputs, warm_up
from convoy.tensors import serialize_bytes

from .conftest import make_repository, start_server

MODEL = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] },
        { name: "t" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
WARMUP = """
model_warmup [ {
  name: "zeros" batch_size: 4 count: 3
  inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 2, 3 ] zero_data: true } }
  inputs { key: "t" value { data_type: TYPE_STRING dims: [ 1 ] random_data: true } }
}, {
  name: "from files" batch_size: 2
  inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 2, 3 ] input_data_file: "x.bin" } }
  inputs { key: "t" value { data_type: TYPE_STRING dims: [ 1 ] input_data_file: "t.bin" } }
} ]
"""


def spec_of(model: Path, text: str):  # type: ignore[no-untyped-def]
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(model), str(model / "config.pbtxt"), "m")


class Recorder:
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict:  # type: ignore[type-arg]
        self.calls.append(dict(inputs))
        return {}

    def close(self) -> None:
        pass


def test_samples_run_count_times_on_every_instance(tmp_path: Path) -> None:
    model = tmp_path / "m"
    spec = spec_of(model, MODEL + WARMUP)
    assert [(s.name, s.batch_size, s.count) for s in spec.warmup] == [
        ("zeros", 4, 3),
        ("from files", 2, 1),
    ]
    (model / "warmup").mkdir()
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    (model / "warmup/x.bin").write_bytes(x.tobytes())
    (model / "warmup/t.bin").write_bytes(serialize_bytes(np.array([b"ab", b"cde"], object)))
    zeros, files = (sample_inputs(s, spec, model) for s in spec.warmup)
    assert zeros["x"].shape == (4, 2, 3) and not zeros["x"].any()
    assert zeros["t"].shape == (4, 1) and all(len(v) == 8 for v in zeros["t"].ravel())
    np.testing.assert_array_equal(files["x"], x)
    assert files["t"].ravel().tolist() == [b"ab", b"cde"]
    backends = [Recorder(), Recorder()]
    warm_up(backends, spec, model)  # type: ignore[arg-type]
    assert [len(b.calls) for b in backends] == [4, 4]  # 3 x "zeros" + 1 x "from files"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("batch_size: 4", "batch_size: 9"), "model_warmup[0].batch_size"),
        (('key: "x" value { data_type: TYPE_FP32', 'key: "x" value { data_type: TYPE_INT32'),
         "model_warmup[0].inputs[x].data_type"),
        (("dims: [ 2, 3 ] zero_data", "dims: [ 3, 2 ] zero_data"),
         "model_warmup[0].inputs[x].dims"),
        (('input_data_file: "x.bin"', 'input_data_file: "../x.bin"'),
         "model_warmup[1].inputs[x].input_data_file"),
        (('key: "t" value { data_type: TYPE_STRING dims: [ 1 ] random_data: true }',
          'key: "z" value { data_type: TYPE_STRING dims: [ 1 ] random_data: true }'),
         "model_warmup[0].inputs"),
    ],
)  # fmt: skip
def test_bad_samples_name_the_field(tmp_path: Path, change: tuple[str, str], field: str) -> None:
    assert change[0] in WARMUP
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        spec_of(tmp_path / "m", MODEL + WARMUP.replace(*change))


def test_missing_warmup_file_fails_the_load_and_names_it(tmp_path: Path) -> None:
    model = tmp_path / "m"
    spec = spec_of(model, MODEL + WARMUP)
    with pytest.raises(ConfigError, match=r"warmup/[xt]\.bin: input_data_file"):
        warm_up([Recorder()], spec, model)  # type: ignore[list-item]


@pytest.mark.e2e
def test_models_warm_up_at_load_and_a_failing_sample_keeps_its_model_out(
    tmp_path: Path, examples_dir: Path
) -> None:
    repo = make_repository(tmp_path / "repo", examples_dir, ("tiny", "image_classifier"))
    tiny = repo / "tiny/config.pbtxt"
    tiny.write_text(
        tiny.read_text()
        + 'model_warmup [ { name: "w" batch_size: 8 count: 2 inputs { key: "INPUT0" value '
        "{ data_type: TYPE_FP32 dims: [ 16 ] random_data: true } } } ]\n"
    )
    classifier = repo / "image_classifier/config.pbtxt"
    classifier.write_text(
        classifier.read_text()
        + 'model_warmup [ { name: "broken" batch_size: 1 inputs { key: "INPUT" value '
        '{ data_type: TYPE_FP32 dims: [ 3, 64, 64 ] input_data_file: "absent.bin" } } } ]\n'
    )
    server = start_server(repo)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        assert client.is_model_ready("tiny")
        assert not client.is_model_ready("image_classifier")
        client.close()
        output = server.output()
        assert "warm-up 'w' ran 2 time(s) on 1 instance(s)" in output
        assert "warmup/absent.bin" in output
    finally:
        server.stop()
