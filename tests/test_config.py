from __future__ import annotations

from pathlib import Path

import pytest

from convoy.config import VersionPolicy, read_model_config, validate_model_config
from convoy.errors import ConfigError

GOOD = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 2 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 2 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 10 timeout_action: DELAY default_timeout_microseconds: 5 }
  priority_queue_policy { key: 1 value: { max_queue_size: 3 } }
}
instance_group [ { count: 2 kind: KIND_CPU }, { kind: KIND_GPU gpus: [ 0 ] } ]
parameters { key: "team_owner" value { string_value: "search" } }
"""


def spec_of(tmp_path: Path, text: str, name: str = "m"):  # type: ignore[no-untyped-def]
    model = tmp_path / name
    model.mkdir(exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(model), str(model / "config.pbtxt"), name)


def test_full_config_parses(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, GOOD)
    assert spec.backend == "onnxruntime"
    assert spec.inputs[0].dims == (-1, 4) and spec.inputs[0].datatype == "FP32"
    assert spec.outputs[0].datatype == "INT64"
    assert spec.batching is not None
    assert spec.batching.preferred_batch_sizes == (2, 4)
    assert spec.batching.default_queue_policy.timeout_action == "DELAY"
    assert spec.batching.policy_for(1).max_queue_size == 3
    assert spec.batching.policy_for(2).max_queue_size == 10
    assert [(g.kind, g.count) for g in spec.instance_groups] == [("KIND_CPU", 2), ("KIND_GPU", 1)]
    assert spec.parameters == {"team_owner": "search"}  # unknown keys are kept, not refused
    assert spec.default_model_filename == "model.onnx"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("max_batch_size: 8", "max_batch_size: 8 bogus_field: 1"), "bogus_field"),
        (("max_batch_size: 8", "max_batch_size: -1"), "max_batch_size"),
        (("TYPE_FP32", "TYPE_INVALID"), "input[0].data_type"),
        (("dims: [ -1, 4 ]", "dims: [ 0, 4 ]"), "input[0].dims"),
        (
            ("dims: [ 2 ] } ]", 'dims: [ 2 ] }, { name: "y" data_type: TYPE_FP32 dims: [1] } ]'),
            "output[1].name",
        ),
        (
            ("preferred_batch_size: [ 4, 2 ]", "preferred_batch_size: [ 16 ]"),
            "preferred_batch_size",
        ),
        (("default_priority_level: 2", "default_priority_level: 5"), "default_priority_level"),
        (('platform: "onnxruntime_onnx"', 'platform: "caffe2"'), "platform"),
        (('name: "m"', 'name: "other"'), "name"),
        (("count: 2", "count: -2"), "instance_group[0].count"),
        # Text format takes any number for an enum; unknown ones are named, not crashed on.
        (("data_type: TYPE_INT64", "data_type: 64"), "output[0].data_type"),
        (("kind: KIND_CPU", "kind: 9"), "instance_group[0].kind"),
        (
            ("timeout_action: DELAY", "timeout_action: 7"),
            "dynamic_batching.default_queue_policy.timeout_action",
        ),
        (
            (
                'key: "team_owner" value { string_value: "search" }',
                'key: "latency_slo_p99_ms" value { string_value: "soon" }',
            ),
            "parameters.latency_slo_p99_ms",
        ),
        (
            (
                'key: "team_owner" value { string_value: "search" }',
                'key: "latency_slo_p99_ms" value { string_value: "-5" }',
            ),
            "parameters.latency_slo_p99_ms",
        ),
        (
            (
                'key: "team_owner" value { string_value: "search" }',
                'key: "classification_softmax" value { string_value: "y,z" }',
            ),
            "parameters.classification_softmax",
        ),
        (
            (
                'key: "team_owner" value { string_value: "search" }',
                'key: "classification_softmax" value { string_value: " , " }',
            ),
            "parameters.classification_softmax",
        ),
    ],
)
def test_bad_configs_name_file_and_field(
    tmp_path: Path, change: tuple[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        spec_of(tmp_path, GOOD.replace(*change))
    assert "m/config.pbtxt" in str(info.value)
    assert field in str(info.value)


def test_classification_softmax_lists_outputs(tmp_path: Path) -> None:
    text = GOOD.replace('"team_owner" value { string_value: "search" }',
                        '"classification_softmax" value { string_value: " y " }')  # fmt: skip
    assert spec_of(tmp_path, text).softmax_outputs == frozenset({"y"})
    assert spec_of(tmp_path, GOOD).softmax_outputs == frozenset()


def test_version_policies() -> None:
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy(kind="latest", num_versions=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(kind="all").select([3, 1]) == [1, 3]
    assert VersionPolicy(kind="specific", versions=(1, 9)).select([1, 2]) == [1]
    assert VersionPolicy().select([]) == []


@pytest.mark.parametrize("block", ["sequence_batching { }", "ensemble_scheduling { }"])
def test_unsupported_schedulers_are_refused_not_ignored(tmp_path: Path, block: str) -> None:
    text = GOOD[: GOOD.index("dynamic_batching")] + block + "\n"
    with pytest.raises(ConfigError, match=block.split()[0]):
        spec_of(tmp_path, text)


CUDA_CONFIG = """
name: "m"
platform: "pytorch_libtorch"
max_batch_size: 32
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { preferred_batch_size: [ 8, 16 ] }
"""


@pytest.mark.parametrize(
    ("optimization", "parameters", "buckets"),
    [
        ("", "", ()),
        ("optimization { cuda { graphs: true } }", "", (8, 16, 32)),
        (
            "optimization { cuda { graphs: true graph_spec [ { batch_size: 4 }, "
            "{ batch_size: 1 } ] } }",
            "",
            (1, 4),
        ),
        ("", 'parameters { key: "cuda_graph_batch_sizes" value { string_value: "2,1" } }', (1, 2)),
    ],
)
def test_cuda_graph_buckets_from_triton_optimization_or_parameters(
    tmp_path: Path, optimization: str, parameters: str, buckets: tuple[int, ...]
) -> None:
    from convoy.backends.pytorch import graph_buckets

    spec = spec_of(tmp_path, CUDA_CONFIG + optimization + parameters)
    assert graph_buckets(spec) == buckets
    assert spec.cuda.graphs == ("graphs: true" in optimization)


def test_cuda_options_are_checked(tmp_path: Path) -> None:
    from convoy.backends.pytorch import graph_buckets

    text = CUDA_CONFIG + "optimization { cuda { busy_wait_events: true } }"
    assert spec_of(tmp_path, text).cuda.busy_wait_events
    with pytest.raises(ConfigError, match=r"optimization.cuda.graph_spec\[0\].batch_size"):
        spec_of(tmp_path, CUDA_CONFIG + "optimization { cuda { graph_spec { batch_size: 64 } } }")
    variable = CUDA_CONFIG.replace("dims: [ 4 ] } ]\noutput", "dims: [ -1 ] } ]\noutput")
    with pytest.raises(ConfigError, match="fixed input dims"):
        graph_buckets(spec_of(tmp_path, variable + "optimization { cuda { graphs: true } }"))
    tokenized = CUDA_CONFIG.replace(
        'name: "x" data_type: TYPE_FP32', 'name: "x" data_type: TYPE_STRING'
    ).replace("dims: [ 4 ] } ]\noutput", "dims: [ 1 ] } ]\noutput")
    tokenized += 'parameters { key: "tokenizer" value { string_value: "t.json" } }'
    with pytest.raises(ConfigError, match="text varies in length"):
        graph_buckets(spec_of(tmp_path, tokenized + "optimization { cuda { graphs: true } }"))


def test_the_gpu_example_in_the_docs_is_valid(tmp_path: Path) -> None:
    from convoy.backends.pytorch import graph_buckets

    docs = (Path(__file__).parent.parent / "docs/models.md").read_text()
    text = docs.split('```\nname: "resnet_gpu"', 1)[1].split("```", 1)[0]
    model = tmp_path / "resnet_gpu"
    model.mkdir()
    (model / "config.pbtxt").write_text('name: "resnet_gpu"' + text)
    spec = validate_model_config(read_model_config(model), str(model), "resnet_gpu")
    assert graph_buckets(spec) == (16, 64)
    assert spec.softmax_outputs == frozenset({"LOGITS"}) and spec.cpu_spill_after_s == 0.05
    assert [(g.kind, g.count) for g in spec.instance_groups] == [("KIND_GPU", 2), ("KIND_CPU", 1)]
    assert spec.warmup[0].batch_size == 64


def test_ensemble_configs_are_checked_as_files(tmp_path: Path) -> None:
    """What the file alone shows; the steps are checked against their models at load."""
    base = """
name: "m"
platform: "ensemble"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
    with pytest.raises(ConfigError, match="at least one step"):
        spec_of(tmp_path, base)
    step = 'ensemble_scheduling { step [ { model_name: "a" model_version: %s %s } ] }'
    maps = 'input_map { key: "x" value: "IN" } output_map { key: "y" value: "OUT" }'
    with pytest.raises(ConfigError, match=r"step\[0\].model_version"):
        spec_of(tmp_path, base + step % ("0", maps))
    with pytest.raises(ConfigError, match="input_map and an output_map"):
        spec_of(tmp_path, base + step % ("-1", ""))
    spec = spec_of(tmp_path, base + step % ("-1", maps))
    assert spec.backend == "ensemble" and spec.ensemble[0].model == "a"
    assert spec.ensemble[0].input_map == (("x", "IN"),) and spec.ensemble[0].version == -1
