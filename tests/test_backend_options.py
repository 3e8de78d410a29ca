"""The runtimes' `parameters`, typed and checked when config.pbtxt is validated:
a typo or a bad value fails the load naming `parameters.<key>`, before any model
file is read or engine built; keys Convoy does not read are left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.config import (
    BackendOptions,
    ImageOptions,
    TensorRTOptions,
    TextOptions,
    read_model_config,
    validate_model_config,
)
from convoy.errors import ConfigError

BASE = """
name: "m"
backend: "{backend}"
max_batch_size: 8
input [ {{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ 32, 32, 3 ] }} ]
output [ {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ 10 ] }} ]
"""
TEXT = """
name: "m"
backend: "{backend}"
max_batch_size: 8
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 4 ] }} ]
"""


def spec_of(tmp_path: Path, backend: str, base: str = BASE, **parameters: str):  # type: ignore[no-untyped-def]
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    extra = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in parameters.items()
    )
    (model / "config.pbtxt").write_text(base.format(backend=backend) + extra)
    return validate_model_config(read_model_config(model), str(model / "config.pbtxt"), "m")


def test_defaults_without_parameters(tmp_path: Path) -> None:
    assert spec_of(tmp_path, "pytorch").options == BackendOptions()


def test_every_parameter_a_runtime_reads_is_typed(tmp_path: Path) -> None:
    torch = spec_of(
        tmp_path, "pytorch", precision="bf16", cuda_graph_batch_sizes="8,1,4,4",
        preprocess="image_hwc_uint8", preprocess_mean="0.5,0.5,0.5", preprocess_std="0.2,0.2,0.2",
        classification_softmax="LOGITS",
    )  # fmt: skip
    assert torch.options.precision == "bf16"
    assert torch.options.cuda_graph_batch_sizes == (1, 4, 8)
    assert torch.options.image == ImageOptions("IMAGE", (0.5,) * 3, (0.2,) * 3)
    assert torch.options.softmax_outputs == frozenset({"LOGITS"}) == torch.softmax_outputs
    ort = spec_of(tmp_path, "onnxruntime", intra_op_thread_count="3")
    assert ort.options.intra_op_thread_count == 3
    assert spec_of(tmp_path, "onnxruntime").options.intra_op_thread_count is None
    trt = spec_of(
        tmp_path, "tensorrt", TEXT, trt_precision="int8", trt_calibration_dir="calib",
        trt_dynamic_min="2", trt_dynamic_opt="64", trt_dynamic_max="128",
        tokenizer="tokenizer.json", tokenizer_max_length="128", postprocess="mean_pool_l2",
    )  # fmt: skip
    assert trt.options.tensorrt == TensorRTOptions("int8", "calib", 2, 64, 128)
    assert trt.options.text == TextOptions("TEXT", "tokenizer.json", 128, "mean_pool_l2")


@pytest.mark.parametrize(
    ("backend", "base", "parameters", "key"),
    [
        ("pytorch", BASE, {"precision": "fp61"}, "precision"),
        ("pytorch", BASE, {"cuda_graph_batch_sizes": "1;8"}, "cuda_graph_batch_sizes"),
        ("pytorch", BASE, {"cuda_graph_batch_sizes": "1,16"}, "cuda_graph_batch_sizes"),
        ("pytorch", BASE, {"cuda_graph_batch_sizes": "0,4"}, "cuda_graph_batch_sizes"),
        ("pytorch", TEXT, {"cuda_graph_batch_sizes": "4"}, "cuda_graph_batch_sizes"),
        ("onnxruntime", BASE, {"intra_op_thread_count": "four"}, "intra_op_thread_count"),
        ("tensorrt", BASE, {"trt_precision": "FP16 "}, "trt_precision"),
        ("tensorrt", BASE, {"trt_dynamic_max": "512k"}, "trt_dynamic_max"),
        ("tensorrt", BASE, {"trt_dynamic_min": "0"}, "trt_dynamic_min"),
        ("tensorrt", BASE, {"trt_dynamic_opt": "600"}, r"trt_dynamic_\*"),
        ("tensorrt", BASE, {"trt_calibration_dir": "../elsewhere"}, "trt_calibration_dir"),
        ("onnxruntime", BASE, {"preprocess": "image_chw"}, "preprocess"),
        ("onnxruntime", TEXT, {"preprocess": "image_hwc_uint8"}, "preprocess"),
        ("onnxruntime", BASE, {"preprocess": "image_hwc_uint8", "preprocess_mean": "0.5,0.5"},
         "preprocess_mean"),
        ("onnxruntime", BASE, {"preprocess": "image_hwc_uint8", "preprocess_std": "1,0,1"},
         "preprocess_std"),
        ("onnxruntime", BASE, {"preprocess_mean": "0.5,0.5,0.5"}, "preprocess_mean"),
        ("onnxruntime", BASE, {"tokenizer": "tokenizer.json"}, "tokenizer"),
        ("onnxruntime", TEXT, {"tokenizer": "t.json", "tokenizer_max_length": "long"},
         "tokenizer_max_length"),
        ("onnxruntime", TEXT, {"tokenizer": "t.json", "postprocess": "mean_pool"}, "postprocess"),
        ("onnxruntime", TEXT, {"tokenzier": "t.json", "postprocess": "mean_pool_l2"},
         "postprocess"),
    ],
)  # fmt: skip
def test_a_bad_value_is_a_config_error_naming_the_key(
    tmp_path: Path, backend: str, base: str, parameters: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"parameters\.{key}"):
        spec_of(tmp_path, backend, base, **parameters)


def test_unknown_keys_and_other_runtimes_keys_are_left_alone(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path, "onnxruntime", drift_window="1000", rollout="canary", precision="FP16",
        trt_precision="whatever",
    )  # fmt: skip
    assert spec.options == BackendOptions()
    assert spec.parameters["drift_window"] == "1000" and spec.parameters["precision"] == "FP16"


def test_a_missing_tokenizer_fails_before_the_runtime_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convoy.backends import load_backend
    from convoy.backends import onnxruntime as ort_backend

    spec = spec_of(tmp_path, "onnxruntime", TEXT, tokenizer="absent.json")
    (tmp_path / "m/1").mkdir()
    (tmp_path / "m/1/model.onnx").write_bytes(b"never read")

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the runtime was loaded before the tokenizer was checked")

    monkeypatch.setattr(ort_backend, "OnnxRuntimeBackend", must_not_load)
    with pytest.raises(ConfigError, match=r"absent\.json: parameters\.tokenizer"):
        load_backend(spec, tmp_path / "m/1/model.onnx", "cpu", 1)
