"""Triton's system shared-memory extension through tritonclient's own utilities:
inputs read from and outputs written to POSIX shared memory regions, and every bad
region case answered with a clear status while the server keeps serving."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, make_repository, start_server

with warnings.catch_warnings():  # tritonclient's shm module imports pkg_resources
    warnings.simplefilter("ignore")
    import tritonclient.utils.shared_memory as shm

pytestmark = pytest.mark.e2e

SLEEPY = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        time.sleep(float(inputs["X"].max()))
        return {"Y": inputs["X"] * 2}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("shm"), examples_dir, ("tiny",))
    (repo / "sleepy" / "1").mkdir(parents=True)
    (repo / "sleepy" / "1" / "model.py").write_text(SLEEPY)
    (repo / "sleepy" / "config.pbtxt").write_text(
        'name: "sleepy"\nbackend: "convoy_python"\nmax_batch_size: 4\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    proc = start_server(repo)
    yield proc
    proc.stop()


@pytest.fixture()
def client(served: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(served.url)
    yield c
    c.unregister_system_shared_memory()
    c.close()


def status_of(error: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(error.value.status())


def test_inputs_and_outputs_through_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    data = np.arange(64, dtype=np.float32).reshape(4, 16)
    size = data.nbytes
    handle_in = shm.create_shared_memory_region("in_data", "/convoy_test_in", size)
    handle_out = shm.create_shared_memory_region("out_data", "/convoy_test_out", size)
    try:
        shm.set_shared_memory_region(handle_in, [data])
        client.register_system_shared_memory("in_data", "/convoy_test_in", size)
        client.register_system_shared_memory("out_data", "/convoy_test_out", size)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert set(status) == {"in_data", "out_data"}
        assert int(status["in_data"]["byte_size"]) == size
        tensor = grpcclient.InferInput("INPUT0", [4, 16], "FP32")
        tensor.set_shared_memory("in_data", size)
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("out_data", size)
        result = client.infer("tiny", [tensor], outputs=[output])
        out = result.get_output("OUTPUT0")
        assert out.parameters["shared_memory_byte_size"].int64_param == size
        got = shm.get_contents_as_numpy(handle_out, np.float32, [4, 16])
        np.testing.assert_allclose(got, 2 * data + 1)  # tiny is 2x + 1
        # Mixed: the input in shared memory, the output on the wire.
        wire = client.infer("tiny", [tensor]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(wire, 2 * data + 1)
        client.unregister_system_shared_memory("in_data")
        assert set(client.get_system_shared_memory_status(as_json=True)["regions"]) == {"out_data"}
    finally:
        shm.destroy_shared_memory_region(handle_in)
        shm.destroy_shared_memory_region(handle_out)


def test_every_bad_region_gets_a_clear_error(client: grpcclient.InferenceServerClient) -> None:
    handle = shm.create_shared_memory_region("small", "/convoy_test_small", 64)
    try:
        with pytest.raises(InferenceServerException) as info:  # region larger than the object
            client.register_system_shared_memory("big", "/convoy_test_small", 4096)
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT" and "past the end" in str(
            info.value.message()
        )
        with pytest.raises(InferenceServerException) as info:  # a key that is a path
            client.register_system_shared_memory("evil", "/../../etc/passwd", 16)
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("nothing", "/convoy_no_such_object", 16)
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
        client.register_system_shared_memory("small", "/convoy_test_small", 64)
        with pytest.raises(InferenceServerException) as info:  # twice
            client.register_system_shared_memory("small", "/convoy_test_small", 64)
        assert "already registered" in str(info.value.message())

        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_shared_memory("small", 64, offset=32)  # offset past the region's end
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor])
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
        assert "past the end" in str(info.value.message())
        tensor.set_shared_memory("unknown", 64)
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor])
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
        assert "'unknown' is not registered" in str(info.value.message())
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_shared_memory("small", 32)  # too small for the shape
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor])
        assert "shared memory holds 32 bytes" in str(info.value.message())
        with pytest.raises(InferenceServerException) as info:
            client.get_system_shared_memory_status("unknown")
        assert status_of(info) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            client.unregister_system_shared_memory("unknown")
        assert status_of(info) == "StatusCode.NOT_FOUND"
        ok = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        ok.set_data_from_numpy(np.zeros((1, 16), np.float32))
        assert client.infer("tiny", [ok]).as_numpy("OUTPUT0") is not None  # still serving
    finally:
        shm.destroy_shared_memory_region(handle)


def test_unregister_while_in_use_is_refused(
    served: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    value = np.full((1, 1), 1.0, np.float32)  # the sleepy model sleeps x seconds
    handle = shm.create_shared_memory_region("busy", "/convoy_test_busy", 4)
    try:
        shm.set_shared_memory_region(handle, [value])
        client.register_system_shared_memory("busy", "/convoy_test_busy", 4)
        answers: list[object] = []

        def infer() -> None:
            c = grpcclient.InferenceServerClient(served.url)
            tensor = grpcclient.InferInput("X", [1, 1], "FP32")
            tensor.set_shared_memory("busy", 4)
            answers.append(c.infer("sleepy", [tensor]).as_numpy("Y"))
            c.close()

        thread = threading.Thread(target=infer)
        thread.start()
        time.sleep(0.4)  # the request is in flight, reading the region
        with pytest.raises(InferenceServerException) as info:
            client.unregister_system_shared_memory("busy")
        assert status_of(info) == "StatusCode.FAILED_PRECONDITION"
        thread.join(10)
        assert answers and float(answers[0][0, 0]) == 2.0  # type: ignore[index]
        client.unregister_system_shared_memory("busy")  # free now
    finally:
        shm.destroy_shared_memory_region(handle)
