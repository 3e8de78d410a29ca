"""Triton ensembles end to end: a DAG of models run inside the server, each step through
its model's own batcher, through the stock tritonclient."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

SCALE = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        if (x == -1).any():
            raise RuntimeError("injected step failure")
        return {"Y": x * 3}
"""

PIPELINE = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "TRIPLE" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling {
  step [
    { model_name: "tiny" model_version: -1
      input_map { key: "INPUT0" value: "mid" } output_map { key: "OUTPUT0" value: "OUT" } },
    { model_name: "scale" model_version: -1
      input_map { key: "X" value: "IN" } output_map { key: "Y" value: "mid" } },
    { model_name: "scale" model_version: 1
      input_map { key: "X" value: "IN" } output_map { key: "Y" value: "TRIPLE" } }
  ]
}
"""


def scale_model(repo: Path) -> None:
    (repo / "scale" / "1").mkdir(parents=True)
    (repo / "scale" / "1" / "model.py").write_text(SCALE)
    (repo / "scale" / "config.pbtxt").write_text(
        'name: "scale"\nbackend: "convoy_python"\nmax_batch_size: 8\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 100000 }\n"
    )


def ensemble(repo: Path, name: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)  # Triton wants a (empty) version directory
    (repo / name / "config.pbtxt").write_text(config.replace('"pipeline"', f'"{name}"', 1))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("ensembles"), examples_dir, ("tiny",))
    tiny = repo / "tiny" / "config.pbtxt"
    tiny.write_text(
        tiny.read_text().replace(
            "dynamic_batching { }", "dynamic_batching { max_queue_delay_microseconds: 100000 }"
        )
    )
    scale_model(repo)
    ensemble(repo, "pipeline", PIPELINE)
    bad = {
        "unknown_model": PIPELINE.replace('model_name: "tiny"', 'model_name: "nosuch"'),
        "unknown_input": PIPELINE.replace('key: "INPUT0" value: "mid"', 'key: "NOPE" value: "mid"'),
        "cycle": PIPELINE.replace('key: "X" value: "IN" } output_map { key: "Y" value: "mid"',
                                  'key: "X" value: "OUT" } output_map { key: "Y" value: "mid"'),
        "wrong_type": PIPELINE.replace(
            '{ name: "IN" data_type: TYPE_FP32', '{ name: "IN" data_type: TYPE_INT32'
        ),
        "unproduced": PIPELINE.replace('value: "TRIPLE"', 'value: "OTHER"'),
    }  # fmt: skip
    for name, config in bad.items():
        ensemble(repo, name, config)
    proc = start_server(repo)
    yield proc
    proc.stop()


def infer(url: str, model: str, x: np.ndarray) -> dict[str, np.ndarray] | InferenceServerException:
    client = grpcclient.InferenceServerClient(url)
    name = "IN" if model == "pipeline" else "INPUT0"
    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    try:
        result = client.infer(model, [tensor])
        outputs = result.get_response().outputs
        return {o.name: result.as_numpy(o.name) for o in outputs}
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


def test_the_steps_run_in_order_and_in_parallel(served: ServerProcess) -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    out = infer(served.url, "pipeline", x)
    assert isinstance(out, dict), out
    np.testing.assert_allclose(out["OUT"], 2 * (3 * x) + 1)  # scale, then tiny
    np.testing.assert_allclose(out["TRIPLE"], 3 * x)  # the independent branch


def test_a_composing_model_batches_ensemble_and_direct_callers(served: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(served.url)

    def tiny_stats() -> tuple[int, int]:
        stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    rows_before, batches_before = tiny_stats()
    calls = [("pipeline" if i % 2 else "tiny", np.full((1, 16), i, np.float32)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda c: infer(served.url, *c), calls))
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    rows, batches = tiny_stats()
    assert rows - rows_before == 8  # four direct calls and four ensemble steps
    assert batches - batches_before < 8  # some ran together in one batch
    pipeline = client.get_inference_statistics("pipeline", as_json=True)["model_stats"][0]
    assert int(pipeline["inference_count"]) >= 4
    client.close()


def test_a_failing_step_fails_the_requests_it_carried(served: ServerProcess) -> None:
    """The step's batch fails (its model raised): the ensemble requests in it are
    answered INTERNAL; requests before and after are not affected."""
    assert isinstance(infer(served.url, "pipeline", np.full((1, 16), 1.0, np.float32)), dict)
    failed = infer(served.url, "pipeline", np.full((1, 16), -1.0, np.float32))
    assert isinstance(failed, InferenceServerException)
    assert failed.status() == "StatusCode.INTERNAL"
    assert "injected step failure" in str(failed.message())
    inputs = [np.full((1, 16), v, np.float32) for v in (2.0, 3.0, 4.0)]
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda x: infer(served.url, "pipeline", x), inputs))
    assert all(isinstance(o, dict) for o in outcomes), outcomes


def test_bad_ensembles_fail_their_load_naming_the_step(served: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(served.url)
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    expected = {
        "unknown_model": ("step[0].model_name", "nosuch"),
        "unknown_input": ("step[0].input_map", "no input 'NOPE'"),
        "cycle": ("ensemble_scheduling", "cycle"),
        "wrong_type": ("input_map", "INT32"),
        "unproduced": ("output", "'TRIPLE' is produced by no step"),
    }
    for name, (field, words) in expected.items():
        assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert field in index[name]["reason"] and words in index[name]["reason"], index[name]
    assert client.is_model_ready("pipeline")
    client.close()
