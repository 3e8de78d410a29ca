"""Triton's python backend API, driven through the backend directly."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from convoy import config as config_module
from convoy.backends import triton_python_backend_utils as pb_utils
from convoy.backends.base import RequestInputs, RunsRequests
from convoy.backends.triton_python import TritonPythonBackend
from convoy.config import ModelSpec, read_model_config, validate_model_config
from convoy.errors import ConfigError, ConvoyError, InternalError, InvalidInput

# Triton's python_backend examples/add_sub, as its documentation gives them.
ADD_SUB_CONFIG = """
name: "add_sub"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
instance_group [{ kind: KIND_CPU }]
"""

ADD_SUB_MODEL = """
import json

import numpy as np
import numpy.typing as npt

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])
        self.args = args

    def execute(self, requests):
        output0_dtype = self.output0_dtype
        output1_dtype = self.output1_dtype
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0, out_1 = (
                in_0.as_numpy() + in_1.as_numpy(),
                in_0.as_numpy() - in_1.as_numpy(),
            )
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(output1_dtype))
            inference_response = pb_utils.InferenceResponse(
                output_tensors=[out_tensor_0, out_tensor_1]
            )
            responses.append(inference_response)
        return responses

    def finalize(self):
        print("Cleaning up...")
"""


@pytest.fixture(autouse=True)
def _python_backend_known(monkeypatch: pytest.MonkeyPatch) -> None:
    # Until config.py's DEFAULT_MODEL_FILENAME lists "python" itself.
    monkeypatch.setitem(config_module.DEFAULT_MODEL_FILENAME, "python", "model.py")


def _model(root: Path, source: str, config: str = ADD_SUB_CONFIG) -> tuple[ModelSpec, Path]:
    model_dir = root / "add_sub"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config)
    model_path = model_dir / "1" / "model.py"
    model_path.write_text(textwrap.dedent(source))
    parsed = read_model_config(model_dir)
    spec = validate_model_config(parsed, str(model_dir / "config.pbtxt"), "add_sub")
    return spec, model_path


def _load(tmp_path: Path, source: str, config: str = ADD_SUB_CONFIG) -> TritonPythonBackend:
    spec, model_path = _model(tmp_path, source, config)
    return TritonPythonBackend(model_path, "cpu", spec)


def _f32(array: object) -> npt.NDArray[np.float32]:
    return np.asarray(array, dtype=np.float32)


def _request(
    rows: int, seed: int, outputs: tuple[str, ...] = ("OUTPUT0", "OUTPUT1")
) -> RequestInputs:
    rng = np.random.default_rng(seed)
    return RequestInputs(
        id=f"r{seed}",
        inputs={
            "INPUT0": rng.random((rows, 4), dtype=np.float32),
            "INPUT1": rng.random((rows, 4), dtype=np.float32),
        },
        output_names=outputs,
    )


def test_the_documented_add_sub_model_answers_each_request_of_a_batch(tmp_path: Path) -> None:
    backend = _load(tmp_path, ADD_SUB_MODEL)
    assert isinstance(backend, RunsRequests)
    requests = [_request(1, 1), _request(3, 2), _request(2, 3, ("OUTPUT1",))]
    answers = backend.run_requests(requests)
    assert len(answers) == 3
    for request, answer in zip(requests, answers, strict=True):
        assert isinstance(answer, dict)
        assert tuple(answer) == request.output_names  # only what each request asked for
        a, b = _f32(request.inputs["INPUT0"]), _f32(request.inputs["INPUT1"])
        if "OUTPUT0" in answer:
            np.testing.assert_allclose(_f32(answer["OUTPUT0"]), a + b)
        np.testing.assert_allclose(_f32(answer["OUTPUT1"]), a - b)
        assert answer["OUTPUT1"].shape == (a.shape[0], 4)  # its own rows, not the batch's
    backend.close()


def test_initialize_gets_the_args_triton_passes(tmp_path: Path) -> None:
    backend = _load(tmp_path, ADD_SUB_MODEL)
    args = backend._model.args
    assert set(args) == {
        "model_config",
        "model_instance_kind",
        "model_instance_name",
        "model_instance_device_id",
        "model_repository",
        "model_version",
        "model_name",
    }
    assert all(isinstance(v, str) for v in args.values())
    assert args["model_instance_kind"] == "CPU"
    assert args["model_instance_name"] == "add_sub_0_0"  # Triton: <group>_<index>
    assert args["model_instance_device_id"] == "0"
    assert args["model_version"] == "1"
    assert args["model_name"] == "add_sub"
    assert Path(args["model_repository"]) == tmp_path / "add_sub"
    config = json.loads(args["model_config"])
    # Triton's JSON: proto field names, enum names, numbers for int64 fields.
    assert config["max_batch_size"] == 8
    assert config["backend"] == "python"
    assert config["input"][0] == {**config["input"][0], "name": "INPUT0", "dims": [4]}
    assert config["output"][1]["data_type"] == "TYPE_FP32"
    assert pb_utils.get_model_config(args) == config
    assert pb_utils.get_input_config_by_name(config, "INPUT1")["name"] == "INPUT1"  # type: ignore[index]
    assert pb_utils.get_input_config_by_name(config, "NOPE") is None


def test_run_treats_a_gathered_batch_as_one_request(tmp_path: Path) -> None:
    backend = _load(tmp_path, ADD_SUB_MODEL)
    request = _request(4, 7)
    out = backend.run(request.inputs, ["OUTPUT0"])
    expected = _f32(request.inputs["INPUT0"]) + _f32(request.inputs["INPUT1"])
    np.testing.assert_allclose(_f32(out["OUTPUT0"]), expected)


def test_finalize_runs_at_close(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = _load(tmp_path, ADD_SUB_MODEL)
    backend.close()
    assert "Cleaning up..." in capsys.readouterr().out


def test_the_utils_module_is_importable_under_its_triton_name(tmp_path: Path) -> None:
    _load(tmp_path, ADD_SUB_MODEL)
    import triton_python_backend_utils

    assert sys.modules["triton_python_backend_utils"] is pb_utils
    assert triton_python_backend_utils.Tensor is pb_utils.Tensor


def test_a_helper_module_beside_model_py_imports(tmp_path: Path) -> None:
    spec, model_path = _model(
        tmp_path,
        """
        import triton_python_backend_utils as pb_utils
        from convoy_test_helper_xyz import twice

        class TritonPythonModel:
            def execute(self, requests):
                return [
                    pb_utils.InferenceResponse([
                        pb_utils.Tensor("OUTPUT0", twice(r.inputs()[0].as_numpy())),
                        pb_utils.Tensor("OUTPUT1", r.inputs()[1].as_numpy()),
                    ])
                    for r in requests
                ]
        """,
    )
    (model_path.parent / "convoy_test_helper_xyz.py").write_text(
        "def twice(x):\n    return x * 2\n"
    )
    try:
        backend = TritonPythonBackend(model_path, "cpu", spec)
        (answer,) = backend.run_requests([_request(1, 5)])
        assert isinstance(answer, dict)
        assert str(model_path.parent) not in sys.path  # not left on the process's path
    finally:
        sys.modules.pop("convoy_test_helper_xyz", None)


# -- bad models: a named error at load --------------------------------------------------


def test_a_syntax_error_is_a_config_error_naming_model_py(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "class TritonPythonModel(:\n    pass\n")
    assert info.value.field == "model.py"
    assert "SyntaxError" in info.value.problem


def test_a_missing_class_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="defines no class TritonPythonModel"):
        _load(tmp_path, "class Model:\n    pass\n")


def test_initialize_raising_fails_the_load(tmp_path: Path) -> None:
    source = """
    class TritonPythonModel:
        def initialize(self, args):
            raise ValueError("no weights")
        def execute(self, requests):
            return []
    """
    with pytest.raises(ConfigError, match="no weights") as info:
        _load(tmp_path, source)
    assert info.value.field == "TritonPythonModel.initialize"


def test_a_decoupled_model_is_refused_by_name(tmp_path: Path) -> None:
    config = ADD_SUB_CONFIG + "model_transaction_policy { decoupled: true }\n"
    with pytest.raises(ConfigError, match="DecoupledNotSupported") as info:
        _load(tmp_path, ADD_SUB_MODEL, config)
    assert info.value.field == "model_transaction_policy.decoupled"


# -- bad models: a clear error for the requests ------------------------------------------


def test_execute_raising_fails_the_batch_with_its_message(tmp_path: Path) -> None:
    source = """
    import triton_python_backend_utils as pb_utils
    class TritonPythonModel:
        def execute(self, requests):
            raise pb_utils.TritonModelException("tokenizer exploded")
    """
    backend = _load(tmp_path, source)
    with pytest.raises(InternalError, match="tokenizer exploded"):
        backend.run_requests([_request(1, 1), _request(1, 2)])


def test_a_wrong_number_of_responses_fails_the_batch(tmp_path: Path) -> None:
    source = """
    import triton_python_backend_utils as pb_utils
    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([])]
    """
    backend = _load(tmp_path, source)
    with pytest.raises(InternalError, match="returned 1 responses for 2 requests"):
        backend.run_requests([_request(1, 1), _request(1, 2)])


def test_execute_returning_none_fails_the_batch(tmp_path: Path) -> None:
    source = """
    class TritonPythonModel:
        def execute(self, requests):
            pass
    """
    backend = _load(tmp_path, source)
    with pytest.raises(InternalError, match="one InferenceResponse per request"):
        backend.run_requests([_request(1, 1)])


def test_a_response_with_an_error_fails_only_its_own_request(tmp_path: Path) -> None:
    source = """
    import triton_python_backend_utils as pb_utils
    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                if (x < 0).any():
                    responses.append(pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError(
                            "INPUT0 must not be negative", pb_utils.TritonError.INVALID_ARG
                        ),
                    ))
                    continue
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUTPUT0", x), pb_utils.Tensor("OUTPUT1", -x),
                ]))
            return responses
    """
    backend = _load(tmp_path, source)
    good, bad = _request(1, 1), _request(1, 2)
    bad = RequestInputs(
        "bad", {**bad.inputs, "INPUT0": -_f32(bad.inputs["INPUT0"])}, bad.output_names
    )
    first, second, third = backend.run_requests([good, bad, good])
    assert isinstance(first, dict) and isinstance(third, dict)
    assert isinstance(second, InvalidInput)  # INVALID_ARG answers as Triton's 400
    assert second.message == "INPUT0 must not be negative"
    # Through run (one request), the error is raised.
    with pytest.raises(InvalidInput):
        backend.run(bad.inputs, bad.output_names)


def test_a_response_missing_a_requested_output_fails_that_request(tmp_path: Path) -> None:
    source = """
    import triton_python_backend_utils as pb_utils
    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", r.inputs()[0].as_numpy())
            ]) for r in requests]
    """
    backend = _load(tmp_path, source)
    only0, both = _request(1, 1, ("OUTPUT0",)), _request(1, 2)
    first, second = backend.run_requests([only0, both])
    assert isinstance(first, dict)
    assert isinstance(second, ConvoyError) and "no output ['OUTPUT1']" in second.message


def test_bls_is_refused_with_a_named_error(tmp_path: Path) -> None:
    source = """
    import triton_python_backend_utils as pb_utils
    class TritonPythonModel:
        def execute(self, requests):
            call = pb_utils.InferenceRequest(
                model_name="other", requested_output_names=["Y"], inputs=requests[0].inputs()
            )
            call.exec()
    """
    backend = _load(tmp_path, source)
    with pytest.raises(InternalError, match=r"BLS \(InferenceRequest.exec\) is not supported"):
        backend.run_requests([_request(1, 1)])
    with pytest.raises(pb_utils.BLSNotSupported):
        pb_utils.InferenceRequest(model_name="m").exec()
    with pytest.raises(pb_utils.DecoupledNotSupported):
        pb_utils.InferenceRequest().get_response_sender()


# -- pb_utils itself ---------------------------------------------------------------------


def test_pb_utils_helpers_match_tritons() -> None:
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.numpy_to_triton_type(np.float32) == pb_utils.TRITONSERVER_TYPE_FP32
    assert pb_utils.triton_to_numpy_type(13) is np.object_
    text = np.array([b"ab", b"", b"xyz"], dtype=np.object_)
    packed = pb_utils.serialize_byte_tensor(text)
    assert packed is not None
    assert list(pb_utils.deserialize_bytes_tensor(packed.tobytes())) == [b"ab", b"", b"xyz"]
    tensor = pb_utils.Tensor("T", np.zeros((2, 3), dtype=np.int64))
    assert (tensor.name(), tensor.shape(), tensor.triton_dtype()) == ("T", [2, 3], 9)
    with pytest.raises(pb_utils.TritonModelException, match=r"np\.object_"):
        pb_utils.Tensor("S", np.array(["a"]))
    response = pb_utils.InferenceResponse(output_tensors=[tensor])
    assert pb_utils.get_output_tensor_by_name(response, "T") is tensor
    assert pb_utils.get_output_tensor_by_name(response, "U") is None
    assert not response.has_error()
    error = pb_utils.TritonError("boom")
    assert (error.message(), error.code()) == ("boom", pb_utils.TritonError.INTERNAL)
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.InferenceResponse(output_tensors=tensor)  # type: ignore[arg-type]


def test_dataclasses_with_postponed_annotations_work_in_model_py(tmp_path: Path) -> None:
    source = """
    from __future__ import annotations

    from dataclasses import dataclass

    import triton_python_backend_utils as pb_utils

    @dataclass
    class Scale:
        factor: float

    class TritonPythonModel:
        def initialize(self, args):
            self.scale = Scale(3.0)

        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", r.inputs()[0].as_numpy() * self.scale.factor),
                    pb_utils.Tensor("OUTPUT1", r.inputs()[1].as_numpy()),
                ])
                for r in requests
            ]
    """
    backend = _load(tmp_path, source)
    request = _request(1, 3)
    (answer,) = backend.run_requests([request])
    assert isinstance(answer, dict)
    np.testing.assert_allclose(_f32(answer["OUTPUT0"]), _f32(request.inputs["INPUT0"]) * 3)


# -- through the repository: per-request answers from the pool and the queue ---------------

SIGNED_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        self.batches = []

    def execute(self, requests):
        self.batches.append(len(requests))
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if (x < 0).any():
                error = pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", x * 2), pb_utils.Tensor("OUTPUT1", x)
            ]))
        return responses
"""


def test_a_failed_response_fails_only_its_request_in_a_served_batch(tmp_path: Path) -> None:
    import asyncio

    from convoy.batching.request import InferRequest
    from convoy.metrics import Metrics
    from convoy.repository.manager import ModelRepository

    config = ADD_SUB_CONFIG.replace(
        "instance_group",
        "dynamic_batching { max_queue_delay_microseconds: 200000 }\ninstance_group",
    )
    _model(tmp_path, SIGNED_MODEL, config)

    async def scenario() -> None:
        repository = ModelRepository(tmp_path, Metrics())
        await repository.load("add_sub")
        model = repository.get("add_sub")
        loop = asyncio.get_running_loop()

        def request(value: float, rows: int) -> InferRequest:
            x = np.full((rows, 4), value, dtype=np.float32)
            return InferRequest(
                id=str(value),
                inputs={"INPUT0": x, "INPUT1": x},
                outputs=("OUTPUT0",),
                rows=rows,
                shape_key=(("INPUT0", (4,)), ("INPUT1", (4,))),
                future=loop.create_future(),
            )

        try:
            good, bad, other = await asyncio.gather(
                model.infer(request(1.0, 2)),
                model.infer(request(-1.0, 1)),
                model.infer(request(3.0, 3)),
                return_exceptions=True,
            )
            assert isinstance(bad, InvalidInput) and bad.message == "negative input"
            assert not isinstance(good, BaseException) and not isinstance(other, BaseException)
            np.testing.assert_array_equal(_f32(good.outputs["OUTPUT0"]), np.full((2, 4), 2.0))
            np.testing.assert_array_equal(_f32(other.outputs["OUTPUT0"]), np.full((3, 4), 6.0))
            backend = model.pool.instances[0].backend  # type: ignore[attr-defined]
            assert backend._model.batches == [3]  # one execute call, three requests
        finally:
            await repository.close()

    asyncio.run(scenario())


# -- each loaded model version imports its own modules ------------------------------------
# Triton gives every model its own stub process, so `import helper` in model.py finds the
# helper.py beside it and no other. Convoy serves them all in one process: these load the
# models through the repository (on its loading threads) and check what they answer.

HELPER_MODEL = """
import triton_python_backend_utils as pb_utils
from helper import scale

class TritonPythonModel:
    def execute(self, requests):
        import offsets  # at request time, not at load

        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", scale(x)),
                pb_utils.Tensor("OUTPUT1", offsets.shift(x)),
            ]))
        return responses
"""


def _helper(factor: int) -> str:
    return f"def scale(x):\n    return x * {factor}\n"


def _offsets(offset: int) -> str:
    return f"def shift(x):\n    return x + {offset}\n"


def _write_model(
    root: Path,
    name: str,
    versions: dict[int, dict[str, str]],
    backend: str = "python",
    all_versions: bool = False,
) -> None:
    config = ADD_SUB_CONFIG.replace('"add_sub"', f'"{name}"').replace('"python"', f'"{backend}"')
    if all_versions:
        config += "version_policy { all {} }\n"
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(config)
    for version, files in versions.items():
        (root / name / str(version)).mkdir(exist_ok=True)
        for filename, text in files.items():
            (root / name / str(version) / filename).write_text(textwrap.dedent(text))


async def _outputs(repository: object, name: str, version: str = "") -> tuple[float, float]:
    """OUTPUT0 and OUTPUT1 for an input of ones, through the model's queue and pool."""
    import asyncio

    from convoy.batching.request import InferRequest
    from convoy.repository.manager import ModelRepository

    assert isinstance(repository, ModelRepository)
    x = np.ones((1, 4), dtype=np.float32)
    request = InferRequest(
        id="1",
        inputs={"INPUT0": x, "INPUT1": x},
        outputs=("OUTPUT0", "OUTPUT1"),
        rows=1,
        shape_key=(("INPUT0", (4,)), ("INPUT1", (4,))),
        future=asyncio.get_running_loop().create_future(),
    )
    result = await repository.get(name, version).infer(request)
    return float(result.outputs["OUTPUT0"][0, 0]), float(result.outputs["OUTPUT1"][0, 0])


def _modules_from(directory: Path) -> list[str]:
    """Names in sys.modules of modules whose file lies under `directory`."""
    return [
        name
        for name, module in list(sys.modules.items())
        if Path(getattr(module, "__file__", None) or "/").is_relative_to(directory)
    ]


def _serve(tmp_path: Path, scenario: Any) -> None:
    import asyncio

    from convoy.metrics import Metrics
    from convoy.repository.manager import ModelRepository

    async def run() -> None:
        repository = ModelRepository(tmp_path, Metrics())
        try:
            await scenario(repository)
        finally:
            await repository.close()

    asyncio.run(run())


def test_two_versions_loaded_at_once_each_run_their_own_helpers(tmp_path: Path) -> None:
    _write_model(
        tmp_path,
        "scaler",
        {
            1: {"model.py": HELPER_MODEL, "helper.py": _helper(2), "offsets.py": _offsets(10)},
            2: {"model.py": HELPER_MODEL, "helper.py": _helper(3), "offsets.py": _offsets(20)},
        },
        all_versions=True,
    )

    async def scenario(repository: Any) -> None:
        await repository.load("scaler")
        assert repository.loaded_versions("scaler") == ["1", "2"]
        # Version 2 first: whichever version imports a name first must not decide
        # what the other one runs.
        assert await _outputs(repository, "scaler", "2") == (3.0, 21.0)
        assert await _outputs(repository, "scaler", "1") == (2.0, 11.0)
        assert await _outputs(repository, "scaler", "2") == (3.0, 21.0)
        # Nothing from a version directory is importable by its bare name elsewhere.
        assert "helper" not in sys.modules and "offsets" not in sys.modules

    _serve(tmp_path, scenario)


def test_two_models_with_a_utils_module_each_load_at_once_and_keep_their_own(
    tmp_path: Path,
) -> None:
    import asyncio

    model = HELPER_MODEL.replace("from helper import scale", "from utils import scale").replace(
        "import offsets", "import utils as offsets"
    )

    def utils(factor: int, offset: int) -> str:
        return _helper(factor) + _offsets(offset)

    _write_model(tmp_path, "first", {1: {"model.py": model, "utils.py": utils(2, 100)}})
    _write_model(tmp_path, "second", {1: {"model.py": model, "utils.py": utils(7, 700)}})

    async def scenario(repository: Any) -> None:
        await asyncio.gather(repository.load("first"), repository.load("second"))
        assert await _outputs(repository, "first") == (2.0, 101.0)
        assert await _outputs(repository, "second") == (7.0, 701.0)
        assert await _outputs(repository, "first") == (2.0, 101.0)

    _serve(tmp_path, scenario)


def test_a_reload_after_unload_runs_the_changed_helper(tmp_path: Path) -> None:
    files = {"model.py": HELPER_MODEL, "helper.py": _helper(2), "offsets.py": _offsets(10)}
    _write_model(tmp_path, "scaler", {1: files})
    version_dir = tmp_path / "scaler" / "1"

    async def scenario(repository: Any) -> None:
        await repository.load("scaler")
        assert await _outputs(repository, "scaler") == (2.0, 11.0)
        await repository.unload("scaler")
        assert _modules_from(tmp_path) == []  # the unloaded version's modules are gone
        # The same sizes, and likely the same second: a bytecode cache keyed on mtime
        # and size would not see these edits.
        (version_dir / "helper.py").write_text(_helper(5))
        (version_dir / "offsets.py").write_text(_offsets(40))
        await repository.load("scaler")
        assert await _outputs(repository, "scaler") == (5.0, 41.0)

    _serve(tmp_path, scenario)
    assert _modules_from(tmp_path) == []


@pytest.mark.parametrize(
    "unpickle",
    ["pickle.loads(data)", "pickle._Unpickler(io.BytesIO(data)).load()"],
    ids=["c-pickle", "python-pickle-as-joblib"],
)
def test_a_pickle_naming_a_helper_module_loads_in_initialize(tmp_path: Path, unpickle: str) -> None:
    """As under Triton, where the version directory is on the model's sys.path, a
    pickle (joblib, torch.load) may name a class by its helper module's bare name."""
    model = """
    import io
    import os
    import pickle
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            here = os.path.join(args["model_repository"], args["model_version"])
            with open(os.path.join(here, "scale.pkl"), "rb") as f:
                data = f.read()
            self.scale = UNPICKLE  # features.Scale(), never imported by name here

        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", self.scale(r.inputs()[0].as_numpy())),
                    pb_utils.Tensor("OUTPUT1", r.inputs()[1].as_numpy()),
                ])
                for r in requests
            ]
    """
    model = model.replace("UNPICKLE", unpickle)
    features = "class Scale:\n    def __call__(self, x):\n        return x * {}\n"
    _write_model(
        tmp_path,
        "pickled",
        {
            1: {"model.py": model, "features.py": features.format(4)},
            2: {"model.py": model, "features.py": features.format(6)},
        },
        all_versions=True,
    )
    pickled = b"cfeatures\nScale\n(tR."  # protocol 0: call features.Scale()
    for version in (1, 2):
        (tmp_path / "pickled" / str(version) / "scale.pkl").write_bytes(pickled)

    async def scenario(repository: Any) -> None:
        await repository.load("pickled")
        assert (await _outputs(repository, "pickled", "1"))[0] == 4.0
        assert (await _outputs(repository, "pickled", "2"))[0] == 6.0
        assert "features" not in sys.modules

    _serve(tmp_path, scenario)


def test_convoy_python_models_import_their_own_helpers_too(tmp_path: Path) -> None:
    model = """
    from helper import scale

    class Model:
        def __init__(self, config):
            pass

        def __call__(self, inputs):
            import offsets

            x = inputs["INPUT0"]
            return {"OUTPUT0": scale(x), "OUTPUT1": offsets.shift(x)}
    """
    _write_model(
        tmp_path,
        "plain",
        {
            1: {"model.py": model, "helper.py": _helper(2), "offsets.py": _offsets(10)},
            2: {"model.py": model, "helper.py": _helper(3), "offsets.py": _offsets(20)},
        },
        backend="convoy_python",
        all_versions=True,
    )

    async def scenario(repository: Any) -> None:
        await repository.load("plain")
        assert await _outputs(repository, "plain", "2") == (3.0, 21.0)
        assert await _outputs(repository, "plain", "1") == (2.0, 11.0)
        await repository.unload("plain")
        assert _modules_from(tmp_path) == []

    _serve(tmp_path, scenario)


def test_helper_packages_resolve_within_the_version(tmp_path: Path) -> None:
    """A package beside model.py (relative imports inside it), a directory without
    __init__.py, and a helper that imports a sibling by its bare name."""
    spec, model_path = _model(
        tmp_path,
        """
        import triton_python_backend_utils as pb_utils
        import ops.scaling
        from plain.shift import shift

        class TritonPythonModel:
            def execute(self, requests):
                from ops import twice_then_shift

                return [
                    pb_utils.InferenceResponse([
                        pb_utils.Tensor("OUTPUT0", ops.scaling.scale(r.inputs()[0].as_numpy())),
                        pb_utils.Tensor("OUTPUT1", twice_then_shift(r.inputs()[1].as_numpy())),
                    ])
                    for r in requests
                ]
        """,
    )
    version_dir = model_path.parent
    (version_dir / "ops").mkdir()
    (version_dir / "ops" / "__init__.py").write_text(
        "from .scaling import scale\n"
        "from plain.shift import shift\n\n"
        "def twice_then_shift(x):\n    return shift(scale(x))\n"
    )
    (version_dir / "ops" / "scaling.py").write_text(
        "from factors import FACTOR\n\ndef scale(x):\n    return x * FACTOR\n"
    )
    (version_dir / "factors.py").write_text("FACTOR = 2\n")
    (version_dir / "plain").mkdir()  # no __init__.py
    (version_dir / "plain" / "shift.py").write_text(_offsets(10))
    backend = TritonPythonBackend(model_path, "cpu", spec)
    try:
        (answer,) = backend.run_requests([_request(1, 5)])
        assert isinstance(answer, dict)
        request = _request(1, 5)
        np.testing.assert_allclose(_f32(answer["OUTPUT0"]), _f32(request.inputs["INPUT0"]) * 2)
        np.testing.assert_allclose(_f32(answer["OUTPUT1"]), _f32(request.inputs["INPUT1"]) * 2 + 10)
        assert not {"ops", "ops.scaling", "factors", "plain", "plain.shift"} & set(sys.modules)
    finally:
        backend.close()
    assert _modules_from(version_dir) == []
