"""Triton's CUDA shared-memory extension, proven on the CPU with a fake CUDA driver
(device memory simulated by host bytearrays) and on a GPU, where one is present,
through tritonclient or cuda-python against the real server.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import importlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convoy.api.servicer import InferenceServicer
from convoy.api.status import status_code
from convoy.config import read_model_config, validate_model_config
from convoy.errors import (
    ConvoyError,
    InternalError,
    InvalidInput,
    RegionInUse,
    RegionNotFound,
    Unimplemented,
)
from convoy.inference.cuda_shm import (
    IPC_HANDLE_BYTES,
    CudaError,
    CudaSharedMemoryRegistry,
    SharedMemory,
    load_driver,
)
from convoy.inference.path import InferencePath
from convoy.inference.shm import BYTE_SIZE, OFFSET, REGION, Leases, SharedMemoryRegistry
from convoy.pb import grpc_service_pb2 as pb


class FakeCudaDriver:
    """Device memory as host bytearrays. An IPC handle names one allocation; opening
    it maps the allocation at a fake device address. The current device is per
    thread, as in CUDA, and every access checks it is the allocation's device."""

    def __init__(self, devices: int = 2) -> None:
        self.devices = devices
        self._allocations: dict[bytes, tuple[int, bytearray]] = {}
        self.mapped: dict[int, tuple[int, bytearray]] = {}  # base pointer -> (device, memory)
        self._next = 0x7F00_0000_0000
        self._thread = threading.local()
        self.fail_open: str | None = None
        self.fail_copy: str | None = None
        self.copies = 0

    def allocate(self, size: int, device: int = 0) -> tuple[bytes, bytearray]:
        """What a client does: allocate device memory and export its IPC handle."""
        handle = (len(self._allocations) + 1).to_bytes(8, "little") * (IPC_HANDLE_BYTES // 8)
        memory = bytearray(size)
        self._allocations[handle] = (device, memory)
        return handle, memory

    # -- CudaDriver -----------------------------------------------------------

    def device_count(self) -> int:
        return self.devices

    def set_device(self, device_id: int) -> None:
        if not 0 <= device_id < self.devices:
            raise CudaError(f"cudaSetDevice({device_id}) failed: cudaErrorInvalidDevice")
        self._thread.device = device_id

    def open_ipc_handle(self, raw_handle: bytes) -> int:
        if self.fail_open:
            raise CudaError(f"cudaIpcOpenMemHandle failed: {self.fail_open}")
        if raw_handle not in self._allocations:
            raise CudaError("cudaIpcOpenMemHandle failed: cudaErrorInvalidResourceHandle")
        device, memory = self._allocations[raw_handle]
        self._on(device)
        base, self._next = self._next, self._next + 0x1_0000_0000
        self.mapped[base] = (device, memory)
        return base

    def allocation_size(self, pointer: int) -> int:
        base, memory = self._find(pointer)
        return base + len(memory) - pointer

    def close_ipc_handle(self, pointer: int) -> None:
        device, _ = self.mapped.pop(pointer)
        self._on(device)

    def copy_to_host(self, dst: np.ndarray[Any, Any], src: int) -> None:
        base, memory = self._copy(src, dst.nbytes)
        dst[:] = np.frombuffer(memory, np.uint8, dst.nbytes, src - base)

    def copy_to_device(self, dst: int, src: np.ndarray[Any, Any]) -> None:
        base, memory = self._copy(dst, src.nbytes)
        memory[dst - base : dst - base + src.nbytes] = src.tobytes()

    # -- helpers ----------------------------------------------------------------

    def _copy(self, pointer: int, nbytes: int) -> tuple[int, bytearray]:
        if self.fail_copy:
            raise CudaError(f"cudaMemcpyAsync failed: {self.fail_copy}")
        base, memory = self._find(pointer)
        assert pointer - base + nbytes <= len(memory), "copy past the allocation"
        self._on(self.mapped[base][0])
        self.copies += 1
        return base, memory

    def _find(self, pointer: int) -> tuple[int, bytearray]:
        for base, (_, memory) in self.mapped.items():
            if base <= pointer < base + max(len(memory), 1):
                return base, memory
        raise CudaError(f"{pointer:#x} is not a mapped device address")

    def _on(self, device: int) -> None:
        current = getattr(self._thread, "device", None)
        assert current == device, f"device {device} used while device {current} is current"


@pytest.fixture()
def driver() -> FakeCudaDriver:
    return FakeCudaDriver()


@pytest.fixture()
def cuda(driver: FakeCudaDriver) -> Iterator[CudaSharedMemoryRegistry]:
    registry = CudaSharedMemoryRegistry(driver)
    yield registry
    registry.close()


# -- registering ------------------------------------------------------------------


def test_register_status_unregister(driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry) -> None:
    handle, _ = driver.allocate(256, device=1)
    cuda.register("out", handle, 1, 256)
    [region] = cuda.status("out")
    assert (region.name, region.device_id, region.byte_size) == ("out", 1, 256)
    assert [r.name for r in cuda.status("")] == ["out"]
    with pytest.raises(RegionNotFound, match="'nope'"):
        cuda.status("nope")
    with pytest.raises(RegionNotFound, match="'nope'"):
        cuda.unregister("nope")
    cuda.unregister("out")
    assert cuda.status("") == [] and driver.mapped == {}  # the handle is closed


def test_unregister_all_closes_every_handle(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    for name in ("a", "b"):
        cuda.register(name, driver.allocate(16)[0], 0, 16)
    cuda.unregister("")
    assert cuda.status("") == [] and driver.mapped == {}


def test_a_handle_of_the_wrong_length_is_refused(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    handle, _ = driver.allocate(16)
    encoded = base64.b64encode(handle)  # the classic mistake: the base64 text itself
    with pytest.raises(InvalidInput, match=r"region 'r'.*raw_handle is 88 bytes.*64"):
        cuda.register("r", encoded, 0, 16)
    with pytest.raises(InvalidInput, match="raw_handle is 0 bytes"):
        cuda.register("r", b"", 0, 16)
    assert cuda.status("") == []


def test_an_unknown_device_is_refused(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    handle, _ = driver.allocate(16)
    for device in (2, -1):
        with pytest.raises(InvalidInput, match=rf"region 'r'.*device_id {device}.*2 visible"):
            cuda.register("r", handle, device, 16)
    assert driver.mapped == {}


def test_a_handle_that_will_not_open_names_the_region_and_frees_the_name(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    handle, _ = driver.allocate(16)
    driver.fail_open = "cudaErrorMapBufferObjectFailed"
    with pytest.raises(InvalidInput) as info:
        cuda.register("frames", handle, 0, 16)
    assert status_code(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "'frames'" in info.value.message and "cudaErrorMapBufferObjectFailed" in str(info.value)
    driver.fail_open = None
    cuda.register("frames", handle, 0, 16)  # the failed attempt left nothing behind
    with pytest.raises(InvalidInput, match=r"'stranger'.*cudaErrorInvalidResourceHandle"):
        cuda.register("stranger", b"\x00" * IPC_HANDLE_BYTES, 0, 16)


def test_a_region_larger_than_its_allocation_is_refused(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    handle, _ = driver.allocate(64)
    with pytest.raises(InvalidInput, match=r"'big'.*byte_size 4096 is past the end.*64 bytes"):
        cuda.register("big", handle, 0, 4096)
    assert driver.mapped == {}  # opened to measure, closed again
    for bad in (0, -8):
        with pytest.raises(InvalidInput, match="byte_size must be positive"):
            cuda.register("big", handle, 0, bad)
    with pytest.raises(InvalidInput, match="name is empty"):
        cuda.register("", handle, 0, 64)


def test_names_are_unique_across_system_and_cuda_regions(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry, tmp_path: Path
) -> None:
    system = SharedMemoryRegistry(directory=tmp_path)
    (tmp_path / "convoy_sys").write_bytes(bytes(64))
    SharedMemory(system, cuda)
    system.register("shared", "/convoy_sys", 0, 64)
    with pytest.raises(InvalidInput, match="'shared' is already registered"):
        cuda.register("shared", driver.allocate(16)[0], 0, 16)
    cuda.register("gpu", driver.allocate(16)[0], 0, 16)
    with pytest.raises(InvalidInput, match="'gpu' is already registered"):
        system.register("gpu", "/convoy_sys", 0, 64)
    with pytest.raises(InvalidInput, match="'gpu' is already registered"):
        cuda.register("gpu", driver.allocate(16)[0], 0, 16)
    system.close()


def _register_at_once(
    system: SharedMemoryRegistry, cuda: CudaSharedMemoryRegistry | None, handle: bytes
) -> list[int]:
    """Four threads register region "r" at once (the last in the CUDA registry when
    one is given); the indices of those that succeeded."""
    start = threading.Barrier(4)
    won: list[int] = []

    def attempt(i: int) -> None:
        start.wait()
        try:
            if i == 3 and cuda is not None:
                cuda.register("r", handle, 0, 16)
            else:
                system.register("r", "/convoy_sys", 0, 4096)
            won.append(i)
        except InvalidInput as exc:
            assert "already registered" in exc.message

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return won


def test_one_of_many_concurrent_registers_of_a_name_wins(
    driver: FakeCudaDriver, tmp_path: Path
) -> None:
    """Registers run on worker threads: a name checked by one and not yet stored must
    not pass the check of another (the loser's mapping would be overwritten, and
    never closed), in either registry."""
    (tmp_path / "convoy_sys").write_bytes(bytes(4096))
    handle = driver.allocate(16)[0]
    for round_ in range(100):
        system = SharedMemoryRegistry(directory=tmp_path)
        cuda = CudaSharedMemoryRegistry(driver)
        SharedMemory(system, cuda)
        won = _register_at_once(system, cuda if round_ % 2 else None, handle)
        assert len(won) == 1, (round_, won)
        system.close()
        cuda.close()


def test_without_cuda_python_the_extension_is_off() -> None:
    cuda = CudaSharedMemoryRegistry(None)
    assert not cuda.available and "r" not in cuda
    for call in (
        lambda: cuda.register("r", b"\x00" * IPC_HANDLE_BYTES, 0, 16),
        lambda: cuda.status(""),
        lambda: cuda.unregister(""),
    ):
        with pytest.raises(Unimplemented, match="cuda-python is not installed") as info:
            call()
        assert status_code(info.value) == grpc.StatusCode.UNIMPLEMENTED
    cuda.close()  # nothing to close
    assert CudaSharedMemoryRegistry(FakeCudaDriver(devices=0)).available is False
    assert CudaSharedMemoryRegistry(FakeCudaDriver()).available is True


# -- reading and writing under leases ------------------------------------------------


def test_an_input_is_one_copy_from_the_device_at_its_offset(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    handle, memory = driver.allocate(64, device=1)
    memory[:] = bytes(range(64))
    cuda.register("in", handle, 1, 64)
    driver.set_device(0)  # whatever was current, the region's device is used
    leases = Leases()
    view = cuda.read("input 'X'", "in", 16, 8, leases)
    assert bytes(view) == bytes(range(16, 24)) and driver.copies == 1
    memory[16] = 99  # a copy, not a view of the device
    assert view[0] == 16
    with pytest.raises(RegionInUse) as info:
        cuda.unregister("in")
    assert status_code(info.value) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RegionInUse):
        cuda.unregister("")
    leases.release()
    cuda.unregister("in")


def test_every_bad_bound_names_the_field(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    cuda.register("in", driver.allocate(64)[0], 0, 32)  # a window on a larger allocation
    leases = Leases()
    with pytest.raises(InvalidInput, match=r"input 'X': offset 16 \+ byte_size 32 is past"):
        cuda.read("input 'X'", "in", 16, 32, leases)
    with pytest.raises(InvalidInput, match=r"output 'Y': offset 40 \+ byte_size 0 is past"):
        cuda.writer("output 'Y'", "in", 40, 0, leases)
    with pytest.raises(InvalidInput, match="input 'X': shared memory region 'nope' is not"):
        cuda.read("input 'X'", "nope", 0, 4, leases)
    assert leases.regions == [] and driver.copies == 0  # nothing leased, nothing copied


def test_an_output_reaches_the_device_only_at_commit_and_only_its_bytes(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    handle, memory = driver.allocate(32, device=1)
    memory[:] = b"\xee" * 32
    cuda.register("out", handle, 1, 32)
    leases = Leases()
    target = cuda.writer("output 'Y'", "out", 8, 16, leases)
    assert target.byte_size == 16
    target.write(np.arange(4, dtype=np.uint8))
    assert memory == b"\xee" * 32 and leases.commits  # staged, not yet written
    # Committed from a worker thread (the servicer's to_thread): the device is set there.
    thread = threading.Thread(target=leases.commit)
    thread.start()
    thread.join()
    assert memory == b"\xee" * 8 + bytes([0, 1, 2, 3]) + b"\xee" * 20
    assert not leases.commits
    with pytest.raises(InvalidInput, match="17 bytes do not fit the 16 bytes"):
        target.write(np.zeros(17, np.uint8))
    leases.release()
    cuda.unregister("out")


def test_a_failed_copy_is_an_internal_error_naming_field_and_region(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry
) -> None:
    cuda.register("r", driver.allocate(16)[0], 0, 16)
    driver.fail_copy = "cudaErrorIllegalAddress"
    leases = Leases()
    with pytest.raises(InternalError, match=r"input 'X'.*region 'r'.*cudaErrorIllegalAddress"):
        cuda.read("input 'X'", "r", 0, 16, leases)
    cuda.writer("output 'Y'", "r", 0, 16, leases).write(np.ones(4, np.uint8))
    with pytest.raises(InternalError, match=r"output 'Y'.*region 'r'"):
        leases.commit()
    leases.release()  # a failed request still gives its leases back
    cuda.unregister("r")


def test_close_closes_every_handle(driver: FakeCudaDriver) -> None:
    cuda = CudaSharedMemoryRegistry(driver)
    cuda.register("a", driver.allocate(16)[0], 0, 16)
    cuda.close()
    assert driver.mapped == {} and cuda.status("") == []


def test_the_facade_routes_each_name_to_its_registry(
    driver: FakeCudaDriver, cuda: CudaSharedMemoryRegistry, tmp_path: Path
) -> None:
    system = SharedMemoryRegistry(directory=tmp_path)
    (tmp_path / "convoy_sys").write_bytes(bytes(range(16)))
    regions = SharedMemory(system, cuda)
    system.register("sys", "/convoy_sys", 0, 16)
    handle, memory = driver.allocate(16)
    memory[:] = bytes(range(100, 116))
    cuda.register("gpu", handle, 0, 16)
    leases = Leases()
    assert bytes(regions.input_view("x", "sys", 4, 2, leases)) == bytes([4, 5])
    assert bytes(regions.input_view("x", "gpu", 4, 2, leases)) == bytes([104, 105])
    regions.output("y", "sys", 0, 4, leases).write(np.full(2, 7, np.uint8))
    regions.output("y", "gpu", 0, 4, leases).write(np.full(2, 9, np.uint8))
    leases.commit()
    leases.release()
    assert (tmp_path / "convoy_sys").read_bytes()[:3] == bytes([7, 7, 2])
    assert memory[:3] == bytes([9, 9, 102])
    with pytest.raises(InvalidInput, match="'none' is not registered"):
        regions.input_view("x", "none", 0, 1, leases)
    regions.close()


# -- through the servicer and the inference path ----------------------------------------

CONFIG = """
name: "double"
platform: "tensorrt_plan"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


class FakeModel:
    """Y = 2X + 1, answered when `gate` is set (a request held in flight)."""

    version = 1
    version_label = "1"
    labels = None
    monitoring = None
    input_bounds = None

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "double").mkdir()
        (tmp_path / "double" / "config.pbtxt").write_text(CONFIG)
        config = read_model_config(tmp_path / "double")
        self.spec = validate_model_config(config, "config.pbtxt", "double")
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def infer(self, request: Any) -> Any:
        from convoy.batching.request import InferResult

        self.started.set()
        await self.gate.wait()
        return InferResult(outputs={"Y": request.inputs["X"] * 2 + 1})

    def record_rejection(self, error: ConvoyError) -> None:
        pass


class FakeRepository:
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def get(self, name: str, version: str = "") -> FakeModel:
        return self.model

    async def load(self, name: str) -> None:
        pass


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class FakeContext:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


def make_servicer(tmp_path: Path, driver: FakeCudaDriver | None) -> tuple[Any, FakeModel]:
    """The gRPC servicer over an inference path whose regions use the fake driver; the
    servicer's `path` attribute is what the server would close at shutdown."""
    model = FakeModel(tmp_path)
    cuda = CudaSharedMemoryRegistry(driver)
    system = SharedMemoryRegistry(directory=tmp_path)
    path = InferencePath(FakeRepository(model), shm=system, cuda_shm=cuda)  # type: ignore[arg-type]
    return InferenceServicer(path), model


def infer_request(
    inputs: tuple[str, int, int] | None, output: tuple[str, int, int] | None, x: np.ndarray
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="double")
    tensor = message.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    if inputs is None:
        message.raw_input_contents.append(x.tobytes())
    else:
        tensor.parameters[REGION].string_param = inputs[0]
        tensor.parameters[OFFSET].int64_param = inputs[1]
        tensor.parameters[BYTE_SIZE].int64_param = inputs[2]
    out = message.outputs.add(name="Y")
    if output is not None:
        out.parameters[REGION].string_param = output[0]
        out.parameters[OFFSET].int64_param = output[1]
        out.parameters[BYTE_SIZE].int64_param = output[2]
    return message


def register(servicer: Any, name: str, handle: bytes, device: int, size: int) -> Any:
    """The RPC's coroutine."""
    request = pb.CudaSharedMemoryRegisterRequest(
        name=name, raw_handle=handle, device_id=device, byte_size=size
    )
    return servicer.CudaSharedMemoryRegister(request, FakeContext())


def test_servicer_infers_through_cuda_regions(tmp_path: Path, driver: FakeCudaDriver) -> None:
    async def run() -> None:
        servicer, _ = make_servicer(tmp_path, driver)
        ctx = FakeContext()
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        in_handle, in_memory = driver.allocate(64, device=1)
        in_memory[16:48] = x.tobytes()
        out_handle, out_memory = driver.allocate(64, device=0)
        await register(servicer, "in", in_handle, 1, 64)
        await register(servicer, "out", out_handle, 0, 64)
        status = await servicer.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), ctx)
        assert set(status.regions) == {"in", "out"}
        assert (status.regions["in"].device_id, status.regions["in"].byte_size) == (1, 64)
        meta = await servicer.ServerMetadata(pb.ServerMetadataRequest(), ctx)
        assert "cuda_shared_memory" in meta.extensions

        reply = await servicer.ModelInfer(infer_request(("in", 16, 32), ("out", 0, 64), x), ctx)
        # Written to the device before the answer came back.
        got = np.frombuffer(out_memory, np.float32, 8).reshape(2, 4)
        np.testing.assert_array_equal(got, 2 * x + 1)
        assert reply.outputs[0].parameters[BYTE_SIZE].int64_param == 32
        assert list(reply.raw_output_contents) == [b""]
        # Input in CUDA memory, output on the wire.
        reply = await servicer.ModelInfer(infer_request(("in", 16, 32), None, x), ctx)
        wire = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4)
        np.testing.assert_array_equal(wire, 2 * x + 1)

        await servicer.CudaSharedMemoryUnregister(
            pb.CudaSharedMemoryUnregisterRequest(name="in"), ctx
        )
        status = await servicer.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), ctx)
        assert set(status.regions) == {"out"}
        servicer._path.close()
        assert driver.mapped == {}

    asyncio.run(run())


def test_servicer_answers_every_bad_case_with_its_status(
    tmp_path: Path, driver: FakeCudaDriver
) -> None:
    async def expect(code: grpc.StatusCode, call: Any, *match: str) -> None:
        with pytest.raises(Aborted) as info:
            await call
        assert info.value.code == code, info.value.message
        for text in match:
            assert text in info.value.message, info.value.message

    async def run() -> None:
        servicer, _ = make_servicer(tmp_path, driver)
        ctx = FakeContext()
        x = np.zeros((1, 4), np.float32)
        handle, _ = driver.allocate(16)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        await expect(bad, register(servicer, "r", handle[:10], 0, 16), "'r'", "10 bytes")
        await expect(bad, register(servicer, "r", handle, 7, 16), "device_id 7")
        driver.fail_open = "cudaErrorMapBufferObjectFailed"
        await expect(bad, register(servicer, "r", handle, 0, 16), "'r'", "cudaErrorMapBuffer")
        driver.fail_open = None
        await register(servicer, "r", handle, 0, 16)
        await expect(bad, register(servicer, "r", handle, 0, 16), "already registered")
        (tmp_path / "convoy_sys").write_bytes(bytes(16))
        await expect(
            bad,
            servicer.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="r", key="/convoy_sys", byte_size=16),
                ctx,
            ),
            "already registered",
        )
        infer = servicer.ModelInfer
        await expect(bad, infer(infer_request(("r", 8, 16), None, x), ctx), "past the end")
        await expect(bad, infer(infer_request(("r", 0, 8), None, x), ctx), "holds 8 bytes")
        await expect(bad, infer(infer_request(("zz", 0, 16), None, x), ctx), "'zz' is not")
        await expect(bad, infer(infer_request(None, ("r", 0, 8), x), ctx), "do not fit")
        missing = grpc.StatusCode.NOT_FOUND
        await expect(
            missing,
            servicer.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name="zz"), ctx),
        )
        await expect(
            missing,
            servicer.CudaSharedMemoryUnregister(
                pb.CudaSharedMemoryUnregisterRequest(name="zz"), ctx
            ),
        )
        # Every failed request above gave its lease back.
        await servicer.CudaSharedMemoryUnregister(
            pb.CudaSharedMemoryUnregisterRequest(name="r"), ctx
        )
        servicer._path.close()

    asyncio.run(run())


def test_servicer_refuses_to_unregister_a_region_in_flight(
    tmp_path: Path, driver: FakeCudaDriver
) -> None:
    async def run() -> None:
        servicer, model = make_servicer(tmp_path, driver)
        ctx = FakeContext()
        handle, memory = driver.allocate(16)
        memory[:] = np.ones(4, np.float32).tobytes()
        await register(servicer, "busy", handle, 0, 16)
        model.gate.clear()
        request = infer_request(("busy", 0, 16), ("busy", 0, 16), np.ones((1, 4), np.float32))
        answer = asyncio.create_task(servicer.ModelInfer(request, ctx))
        await model.started.wait()
        unregister = pb.CudaSharedMemoryUnregisterRequest(name="busy")
        with pytest.raises(Aborted) as info:
            await servicer.CudaSharedMemoryUnregister(unregister, ctx)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        model.gate.set()
        await answer
        assert np.frombuffer(memory, np.float32).tolist() == [3.0] * 4  # in place: 2x + 1
        await servicer.CudaSharedMemoryUnregister(unregister, ctx)  # free now
        servicer._path.close()

    asyncio.run(run())


class SlowCopyDriver(FakeCudaDriver):
    """Holds each copy to the device until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.copying = threading.Event()
        self.go = threading.Event()

    def copy_to_device(self, dst: int, src: np.ndarray[Any, Any]) -> None:
        self.copying.set()
        self.go.wait(10)
        super().copy_to_device(dst, src)


def test_a_region_stays_leased_while_a_cancelled_call_s_copy_to_it_runs(tmp_path: Path) -> None:
    """The caller leaves while its outputs are being copied to its CUDA region (in a
    thread, which cannot be stopped): unregistering that region is refused until the
    copy has ended, so its handle is never closed under the copy."""
    driver = SlowCopyDriver()

    async def run() -> None:
        servicer, _ = make_servicer(tmp_path, driver)
        ctx = FakeContext()
        handle, memory = driver.allocate(16)
        await register(servicer, "out", handle, 0, 16)
        x = np.ones((1, 4), np.float32)
        call = asyncio.create_task(servicer.ModelInfer(infer_request(None, ("out", 0, 16), x), ctx))
        await asyncio.to_thread(driver.copying.wait, 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        unregister = pb.CudaSharedMemoryUnregisterRequest(name="out")
        with pytest.raises(Aborted) as info:
            await servicer.CudaSharedMemoryUnregister(unregister, ctx)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        driver.go.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            try:
                await servicer.CudaSharedMemoryUnregister(unregister, ctx)
                break
            except Aborted:
                continue
        status = await servicer.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), ctx)
        assert not status.regions  # unregistered once the copy was done
        assert np.frombuffer(memory, np.float32).tolist() == [3.0] * 4  # the copy completed
        servicer._path.close()
        assert driver.mapped == {}

    asyncio.run(run())


def test_servicer_without_cuda_python_answers_unimplemented(tmp_path: Path) -> None:
    async def run() -> None:
        servicer, _ = make_servicer(tmp_path, None)
        ctx = FakeContext()
        meta = await servicer.ServerMetadata(pb.ServerMetadataRequest(), ctx)
        assert "cuda_shared_memory" not in meta.extensions
        for call in (
            register(servicer, "r", b"\x00" * IPC_HANDLE_BYTES, 0, 16),
            servicer.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), ctx),
            servicer.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(), ctx),
        ):
            with pytest.raises(Aborted) as info:
                await call
            assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
        servicer._path.close()

    asyncio.run(run())


# -- the real driver ------------------------------------------------------------------


def _cuda_python() -> Any | None:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    return None


def _gpu_count() -> int:
    driver = load_driver()
    return driver.device_count() if driver is not None else 0


def test_the_real_driver_without_a_gpu_refuses_clearly() -> None:
    """Where cuda-python is installed but no GPU (or no NVIDIA driver) is present."""
    driver = load_driver()
    if driver is None:
        pytest.skip("cuda-python is not installed (the 'gpu' extra)")
    if driver.device_count():
        pytest.skip("a GPU is present: test_gpu_region_through_the_server covers it")
    cuda = CudaSharedMemoryRegistry(driver)
    assert not cuda.available
    with pytest.raises(InvalidInput, match=r"device_id 0 is not a CUDA device.*0 visible"):
        cuda.register("r", b"\x00" * IPC_HANDLE_BYTES, 0, 16)
    with pytest.raises(CudaError, match="cudaIpcOpenMemHandle"):
        driver.open_ipc_handle(b"\x00" * IPC_HANDLE_BYTES)
    with pytest.raises(CudaError, match="cuMemGetAddressRange"):
        driver.allocation_size(0x1000)


class _DeviceBuffer:
    """A client's CUDA region through cuda-python alone (tritonclient 2.41's
    cuda_shared_memory imports `cuda.cudart`, which cuda-python 13 dropped)."""

    def __init__(self, rt: Any, size: int, device: int = 0) -> None:
        self._rt, self.size, self.device = rt, size, device
        self._check(rt.cudaSetDevice(device))
        self.pointer = int(self._check(rt.cudaMalloc(size)))
        handle = self._check(rt.cudaIpcGetMemHandle(self.pointer))
        self.raw_handle = ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)

    @staticmethod
    def _check(result: Any) -> Any:
        assert int(result[0]) == 0, result[0]
        return result[1] if len(result) > 1 else None

    def write(self, data: np.ndarray[Any, Any]) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpy(self.pointer, data.ctypes.data, data.nbytes, kind))

    def read(self, dtype: Any, shape: list[int]) -> np.ndarray[Any, Any]:
        out = np.empty(shape, dtype)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpy(out.ctypes.data, self.pointer, out.nbytes, kind))
        return out

    def free(self) -> None:
        self._check(self._rt.cudaFree(self.pointer))


@pytest.mark.gpu
@pytest.mark.e2e
def test_gpu_region_through_the_server(small_examples: Path, tmp_path: Path) -> None:
    """A client process's device memory in and out of the real server (IPC handles
    open only in another process, hence the server subprocess)."""
    rt = _cuda_python()
    if rt is None:
        pytest.skip("cuda-python is not installed (the 'gpu' extra)")
    if _gpu_count() == 0:
        pytest.skip("no CUDA GPU on this machine")
    import tritonclient.grpc as grpcclient

    from .conftest import make_repository, start_server

    try:
        with warnings.catch_warnings():  # it imports pkg_resources
            warnings.simplefilter("ignore")
            import tritonclient.utils.cuda_shared_memory as cudashm
    except Exception:  # absent, or needing `cuda.cudart` (gone from cuda-python 13)
        cudashm = None
    data = np.arange(64, dtype=np.float32).reshape(4, 16)
    size = data.nbytes
    proc = start_server(make_repository(tmp_path / "repo", small_examples, ("tiny",)))
    client = grpcclient.InferenceServerClient(proc.url)
    buffers: list[Any] = []
    try:
        assert "cuda_shared_memory" in client.get_server_metadata().extensions
        if cudashm is not None:
            region_in = cudashm.create_shared_memory_region("in", size, 0)
            region_out = cudashm.create_shared_memory_region("out", size, 0)
            buffers = [region_in, region_out]
            cudashm.set_shared_memory_region(region_in, [data])
            handles = [cudashm.get_raw_handle(r) for r in buffers]
        else:
            buffers = [_DeviceBuffer(rt, size), _DeviceBuffer(rt, size)]
            buffers[0].write(data)
            handles = [base64.b64encode(b.raw_handle) for b in buffers]
        client.register_cuda_shared_memory("in", handles[0], 0, size)
        client.register_cuda_shared_memory("out", handles[1], 0, size)
        status = client.get_cuda_shared_memory_status(as_json=True)["regions"]
        assert set(status) == {"in", "out"}
        tensor = grpcclient.InferInput("INPUT0", [4, 16], "FP32")
        tensor.set_shared_memory("in", size)
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("out", size)
        client.infer("tiny", [tensor], outputs=[output])
        if cudashm is not None:
            got = cudashm.get_contents_as_numpy(buffers[1], np.float32, [4, 16])
        else:
            got = buffers[1].read(np.float32, [4, 16])
        np.testing.assert_allclose(got, 2 * data + 1)  # tiny is 2x + 1
        client.unregister_cuda_shared_memory()
        assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")
    finally:
        client.close()
        proc.stop()
        for buffer in buffers:
            if cudashm is not None:
                cudashm.destroy_shared_memory_region(buffer)
            else:
                buffer.free()
