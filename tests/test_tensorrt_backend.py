"""TensorRTBackend against a fake TensorRT (none installs here): engines and contexts
made on the instance's device, the caller's device restored after a build, and an
input past the optimisation profile refused as INVALID_ARGUMENT, at decode where
the codec asks, else when the batch runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convoy.backends.base import ShapeRange, check_input_bounds, input_bounds
from convoy.config import read_model_config, validate_model_config
from convoy.errors import ConfigError, InvalidInput

from .trt_fakes import install

CONFIG = """
name: "bert"
backend: "tensorrt"
max_batch_size: 32
input [ { name: "ids" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "out" data_type: TYPE_FP32 dims: [ 4 ] } ]
parameters { key: "trt_dynamic_max" value { string_value: "256" } }
parameters { key: "trt_precision" value { string_value: "fp32" } }
"""


def spec_of(tmp_path: Path, text: str = CONFIG):  # type: ignore[no-untyped-def]
    model = tmp_path / "bert"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(model), str(model / "config.pbtxt"), "bert")


def plan(tmp_path: Path) -> Path:
    path = tmp_path / "bert/1/model.plan"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"serialized engine")
    return path


def test_engine_and_context_are_made_on_the_instance_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, devices = install(monkeypatch)
    spec = spec_of(tmp_path)
    module.TensorRTBackend(plan(tmp_path), "cuda:1", spec)
    assert devices.seen["deserialize_cuda_engine"] == 1
    assert devices.seen["create_execution_context"] == 1
    assert devices.current == 0  # the loading thread's device is left as it was


def test_build_engine_builds_on_its_gpu_and_restores_the_current_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import TensorProto, helper

    module, devices = install(monkeypatch)
    monkeypatch.setenv("CONVOY_CACHE_DIR", str(tmp_path / "cache"))
    spec = spec_of(tmp_path)
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])
    y = helper.make_tensor_value_info("out", TensorProto.INT64, [None, None])
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "g", [x], [y])
    source = tmp_path / "bert/1/model.onnx"
    onnx.save(helper.make_model(graph), str(source))
    built = module.build_engine(source, spec, gpu=1)
    assert built.read_bytes() == b"engine"
    assert devices.seen["Builder"] == devices.seen["build_serialized_network"] == 1
    assert devices.current == 0


def test_a_dim_past_the_profile_fails_as_invalid_input_naming_the_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, _ = install(monkeypatch)
    backend = module.TensorRTBackend(plan(tmp_path), "cuda:0", spec_of(tmp_path))
    out = backend.run({"ids": np.ones((2, 200), np.int64)}, ["out"])["out"]
    assert out.shape == (2, 4) and backend._context.executed == 1
    with pytest.raises(InvalidInput, match=r"'ids'.*\[2, 300\].*min \[1, 1\], max \[32, 256\]"):
        backend.run({"ids": np.ones((2, 300), np.int64)}, ["out"])
    assert backend._context.executed == 1  # nothing ran for the refused batch
    assert backend._buffers["ids"].numel() == 32 * 256  # nor did its buffer grow


def test_the_profile_bounds_are_checkable_at_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, _ = install(monkeypatch)
    backend = module.TensorRTBackend(plan(tmp_path), "cuda:0", spec_of(tmp_path))
    bounds = input_bounds(backend)
    assert bounds == {"ids": ShapeRange((1,), (256,))}  # per item, past the batch dim
    check_input_bounds(bounds, "ids", (256,))
    check_input_bounds(bounds, "other", (9999,))  # not bounded
    with pytest.raises(InvalidInput, match=r"input 'ids': shape \[257\] is outside"):
        check_input_bounds(bounds, "ids", (257,))
    backend.stages.inputs["ids"] = lambda t: t  # a stage in front reshapes it: not ours
    assert input_bounds(backend) == {}
    assert input_bounds(object()) == {}


@pytest.mark.parametrize(
    ("profile", "extra", "field"),
    [
        (((1, 1), (8, 128), (16, 256)), "", "max_batch_size"),
        (((1, 1), (16, 64), (32, 128)),
         'parameters { key: "tokenizer" value { string_value: "t.json" } }',
         "parameters.tokenizer_max_length"),
    ],
)  # fmt: skip
def test_a_plan_taking_less_than_the_config_promises_is_refused_at_load(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    profile: tuple[tuple[int, ...], ...],
    extra: str,
    field: str,
) -> None:
    module, _ = install(monkeypatch, profile)
    text = CONFIG + extra
    if extra:
        text = text.replace('name: "ids" data_type: TYPE_INT64 dims: [ -1 ]',
                            'name: "TEXT" data_type: TYPE_STRING dims: [ 1 ]')  # fmt: skip
    with pytest.raises(ConfigError, match=field):
        module.TensorRTBackend(plan(tmp_path), "cuda:0", spec_of(tmp_path, text))


def test_the_ranking_kernel_is_compiled_at_load_for_the_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from convoy.backends.ranking import RankedRows

    module, _ = install(monkeypatch)
    asked: list[tuple[Any, ...]] = []
    monkeypatch.setattr(module, "device_topk", lambda *args: asked.append(args))
    module.TensorRTBackend(plan(tmp_path), "cuda:0", spec_of(tmp_path))
    assert asked == [("cuda:0", (RankedRows(4, False),), [torch.float32])]
