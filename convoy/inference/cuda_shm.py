"""Triton's CUDA shared-memory extension: tensors in another process's GPU memory.

A client allocates device memory, exports it with cudaIpcGetMemHandle and registers
the 64 handle bytes (`raw_handle`) with the device and size (e.g. through
`tritonclient.utils.cuda_shared_memory`); inputs and outputs then name the region in
their parameters exactly as for system shared memory. The server opens the handle
once, at register (cudaIpcOpenMemHandle, the costly step), and closes it at
unregister.

Data path: an input is copied device -> host once, into a host buffer the codec
turns into a numpy array (the batcher and every backend take host arrays today); an
output is copied host -> device from the encoded array itself, when the request's
leases are committed, before the answer is sent. The same bounds and ownership
rules as system regions hold: every bound is checked before a copy, and a region
leased by a request in flight cannot be unregistered.

The CUDA calls sit behind `CudaDriver`, so everything above them is tested on the
CPU with a fake; `CudaRuntimeDriver` is the cuda-python one. cuda-python (the `gpu`
extra) is imported only when a driver is made: without it the extension answers
UNIMPLEMENTED, as it did before it existed.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import InternalError, InvalidInput, RegionNotFound, Unimplemented
from .shm import Leases, SharedMemoryRegistry, lease, removable

log = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)

Bytes = npt.NDArray[np.uint8]


class CudaError(RuntimeError):
    """A CUDA call failed; the message names the call and CUDA's error."""


class CudaDriver(Protocol):
    """The CUDA calls the registry makes; pointers are plain ints.

    The current device is per thread in CUDA, and copies run on whichever thread
    serves the request, so the registry sets the device before every call."""

    def device_count(self) -> int: ...

    def set_device(self, device_id: int) -> None: ...

    def open_ipc_handle(self, raw_handle: bytes) -> int:
        """The device pointer a cudaIpcMemHandle_t maps to, in this process."""
        ...

    def allocation_size(self, pointer: int) -> int:
        """Bytes from `pointer` to the end of the allocation that holds it."""
        ...

    def close_ipc_handle(self, pointer: int) -> None: ...

    def copy_to_host(self, dst: Bytes, src: int) -> None:
        """dst.nbytes bytes from device address src; done when it returns."""
        ...

    def copy_to_device(self, dst: int, src: Bytes) -> None:
        """src.nbytes bytes to device address dst; visible to other processes when
        it returns (the client reads its outputs as soon as it has the answer)."""
        ...


class CudaRuntimeDriver:
    """CudaDriver through cuda-python: `cuda.bindings` (12.6 and later, the only
    layout 13.x ships), else the older `cuda.cudart` / `cuda.cuda` modules."""

    def __init__(self) -> None:
        try:
            runtime = importlib.import_module("cuda.bindings.runtime")
            driver = importlib.import_module("cuda.bindings.driver")
        except ImportError:  # cuda-python before 12.6
            runtime = importlib.import_module("cuda.cudart")
            driver = importlib.import_module("cuda.cuda")
        self._rt: Any = runtime
        self._drv: Any = driver
        # One non-blocking stream per device for our copies: they neither wait for
        # nor hold up the models' work on the legacy default stream.
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            result = function(*args)
        except Exception as exc:  # e.g. cuda-python finding no libcuda for a driver call
            raise CudaError(f"{what} failed: {exc}") from exc
        err = result[0]
        if int(err) != 0:
            raise CudaError(f"{what} failed: {getattr(err, 'name', err)}: {self._text(err)}")
        return result[1] if len(result) == 2 else result[1:]

    def _text(self, err: Any) -> str:
        try:
            if isinstance(err, self._rt.cudaError_t):
                text = self._rt.cudaGetErrorString(err)[1]
            else:
                text = self._drv.cuGetErrorString(err)[1]
        except Exception:  # the description is a courtesy; never mask the error
            return "no description"
        return text.decode() if isinstance(text, bytes) else str(text)

    def device_count(self) -> int:
        try:
            return int(self._call("cudaGetDeviceCount", self._rt.cudaGetDeviceCount))
        except CudaError:  # no driver, no device: nothing to register on
            return 0

    def set_device(self, device_id: int) -> None:
        self._call(f"cudaSetDevice({device_id})", self._rt.cudaSetDevice, device_id)

    def open_ipc_handle(self, raw_handle: bytes) -> int:
        handle = self._rt.cudaIpcMemHandle_t()
        # cuda-python 13 no longer exposes the handle's `reserved` bytes (12.x did, and
        # tritonclient reads them there); the struct's own memory takes them in both.
        ctypes.memmove(handle.getPtr(), raw_handle, IPC_HANDLE_BYTES)
        flags = self._rt.cudaIpcMemLazyEnablePeerAccess
        return int(self._call("cudaIpcOpenMemHandle", self._rt.cudaIpcOpenMemHandle, handle, flags))

    def allocation_size(self, pointer: int) -> int:
        base, size = self._call(
            "cuMemGetAddressRange", self._drv.cuMemGetAddressRange, self._drv.CUdeviceptr(pointer)
        )
        return int(base) + int(size) - pointer

    def close_ipc_handle(self, pointer: int) -> None:
        self._call("cudaIpcCloseMemHandle", self._rt.cudaIpcCloseMemHandle, pointer)

    def copy_to_host(self, dst: Bytes, src: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._copy(dst.ctypes.data, src, dst.nbytes, kind)

    def copy_to_device(self, dst: int, src: Bytes) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(dst, src.ctypes.data, src.nbytes, kind)

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        # From pageable memory a copy may return before the DMA lands; the stream is
        # synchronised so that "returned" means "the other process can read it".
        stream = self._stream()
        self._call("cudaMemcpyAsync", self._rt.cudaMemcpyAsync, dst, src, nbytes, kind, stream)
        self._call("cudaStreamSynchronize", self._rt.cudaStreamSynchronize, stream)

    def _stream(self) -> Any:
        device = int(self._call("cudaGetDevice", self._rt.cudaGetDevice))
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._call(
                    "cudaStreamCreateWithFlags",
                    self._rt.cudaStreamCreateWithFlags,
                    self._rt.cudaStreamNonBlocking,
                )
                self._streams[device] = stream
            return stream


def load_driver() -> CudaDriver | None:
    """The cuda-python driver, or None where cuda-python is not installed."""
    try:
        return CudaRuntimeDriver()
    except ImportError:
        return None


@dataclass
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    pointer: int = field(repr=False)  # device address in this process
    users: int = 0  # leases held by requests in flight


class CudaSharedMemoryRegistry:
    """Registered CUDA IPC regions by name. `driver` None (no cuda-python): the
    extension is off and its three RPCs answer UNIMPLEMENTED, as before it existed."""

    def __init__(self, driver: CudaDriver | None) -> None:
        self._driver = driver
        self._regions: dict[str, CudaRegion] = {}
        self._opening: set[str] = set()  # names being registered (opening is slow)
        # register runs on worker threads; SharedMemory gives both registries one lock,
        # so a name is checked against both and reserved in one step.
        self.names_lock = threading.Lock()
        self._available: bool | None = None
        # The system registry: Triton keeps one namespace of region names.
        self.peer: Container[str] | None = None

    @property
    def available(self) -> bool:
        """Whether regions can be registered here (cuda-python and a GPU present);
        asked once, when the server's metadata is first read."""
        if self._available is None:
            self._available = self._driver is not None and self._driver.device_count() > 0
        return self._available

    def __contains__(self, name: object) -> bool:
        return name in self._regions or name in self._opening

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Open the client's IPC handle; blocking (run it off the event loop)."""
        driver = self._required()
        if not name:
            raise InvalidInput("CUDA shared memory region: name is empty")
        where = f"CUDA shared memory region '{name}'"
        if len(raw_handle) != IPC_HANDLE_BYTES:
            raise InvalidInput(
                f"{where}: raw_handle is {len(raw_handle)} bytes; a cudaIpcMemHandle_t is "
                f"{IPC_HANDLE_BYTES} (the handle's bytes, not base64: tritonclient decodes "
                "get_raw_handle()'s base64 before sending)"
            )
        if byte_size <= 0:
            raise InvalidInput(f"{where}: byte_size must be positive")
        count = driver.device_count()
        if device_id < 0 or device_id >= count:
            raise InvalidInput(
                f"{where}: device_id {device_id} is not a CUDA device of this server "
                f"({count} visible)"
            )
        with self.names_lock:
            if name in self or (self.peer is not None and name in self.peer):
                raise InvalidInput(f"shared memory region '{name}' is already registered")
            self._opening.add(name)
        try:
            pointer = self._open(driver, where, raw_handle, device_id, byte_size)
            with self.names_lock:
                self._regions[name] = CudaRegion(name, device_id, byte_size, pointer)
        finally:
            with self.names_lock:
                self._opening.discard(name)

    def _open(
        self, driver: CudaDriver, where: str, raw_handle: bytes, device_id: int, byte_size: int
    ) -> int:
        try:
            driver.set_device(device_id)
            pointer = driver.open_ipc_handle(raw_handle)
        except CudaError as exc:
            raise InvalidInput(
                f"{where}: cannot open its CUDA IPC handle on device {device_id} ({exc}); "
                "a handle must come from cudaIpcGetMemHandle in another process on this host"
            ) from None
        try:
            size = driver.allocation_size(pointer)
        except CudaError as exc:
            self._close(driver, where, device_id, pointer)
            raise InvalidInput(f"{where}: cannot read its allocation's size ({exc})") from None
        if byte_size > size:
            self._close(driver, where, device_id, pointer)
            raise InvalidInput(
                f"{where}: byte_size {byte_size} is past the end of its device "
                f"allocation ({size} bytes)"
            )
        return pointer

    def _required(self) -> CudaDriver:
        if self._driver is None:
            raise Unimplemented(
                "CUDA shared memory is not available on this server (cuda-python is not "
                "installed; it is in Convoy's 'gpu' extra)"
            )
        return self._driver

    def unregister(self, name: str) -> None:
        """One region, or every region for an empty name; refused while in use."""
        self._required()
        for region_name in removable(self._regions, name, "CUDA shared memory"):
            self._release(self._regions.pop(region_name))

    def status(self, name: str) -> list[CudaRegion]:
        self._required()
        if name and name not in self._regions:
            raise RegionNotFound(f"CUDA shared memory region '{name}' is not registered")
        return [self._regions[name]] if name else list(self._regions.values())

    def read(
        self, field_name: str, name: str, offset: int, byte_size: int, leases: Leases
    ) -> memoryview:
        """byte_size bytes at offset into region `name`, copied to a host buffer; the
        region is leased for this request."""
        region = self._lease(field_name, name, offset, byte_size, leases)
        host: Bytes = np.empty(byte_size, np.uint8)
        if byte_size:
            self.transfer(
                field_name, region, lambda d: d.copy_to_host(host, region.pointer + offset)
            )
        return host.data

    def writer(
        self, field_name: str, name: str, offset: int, byte_size: int, leases: Leases
    ) -> DeviceOutput:
        """Where an output of at most byte_size bytes goes, at offset into region
        `name`; leased for this request, written when its leases are committed."""
        region = self._lease(field_name, name, offset, byte_size, leases)
        return DeviceOutput(self, field_name, region, offset, byte_size, leases)

    def _lease(
        self, field_name: str, name: str, offset: int, byte_size: int, leases: Leases
    ) -> CudaRegion:
        return lease(
            self._regions, field_name, name, offset, byte_size, leases, "CUDA shared memory"
        )

    def transfer(
        self, field_name: str, region: CudaRegion, copy: Callable[[CudaDriver], None]
    ) -> None:
        """One copy to or from a leased region, on its device."""
        driver = self._driver
        assert driver is not None  # a registered region implies a driver
        try:
            driver.set_device(region.device_id)
            copy(driver)
        except CudaError as exc:
            raise InternalError(
                f"{field_name}: copying CUDA shared memory region '{region.name}' on device "
                f"{region.device_id} failed ({exc})"
            ) from None

    def _release(self, region: CudaRegion) -> None:
        assert self._driver is not None
        self._close(
            self._driver,
            f"CUDA shared memory region '{region.name}'",
            region.device_id,
            region.pointer,
        )

    @staticmethod
    def _close(driver: CudaDriver, where: str, device_id: int, pointer: int) -> None:
        # The region is gone from the registry whatever CUDA says: nothing can use it.
        try:
            driver.set_device(device_id)
            driver.close_ipc_handle(pointer)
        except CudaError as exc:
            log.warning("%s: closing its CUDA IPC handle failed: %s", where, exc)

    def close(self) -> None:
        for region in self._regions.values():
            self._release(region)
        self._regions.clear()


class OutputTarget(Protocol):
    """Where one output's bytes go: a slice of a system region or of a CUDA region."""

    @property
    def byte_size(self) -> int: ...

    def write(self, data: Bytes) -> None:
        """data.nbytes <= byte_size bytes, from the start of the slice."""
        ...


class HostOutput:
    """A slice of a mapped system region: written in place."""

    def __init__(self, view: memoryview) -> None:
        self._view = view

    @property
    def byte_size(self) -> int:
        return len(self._view)

    def write(self, data: Bytes) -> None:
        np.frombuffer(self._view, np.uint8, data.nbytes)[:] = data


class DeviceOutput:
    """A slice of a CUDA region: the copy is recorded on the leases and made by
    Leases.commit() (one host -> device copy of the encoded array, no staging)."""

    def __init__(
        self,
        registry: CudaSharedMemoryRegistry,
        field_name: str,
        region: CudaRegion,
        offset: int,
        byte_size: int,
        leases: Leases,
    ) -> None:
        self._registry, self._field, self._region = registry, field_name, region
        self._offset, self._byte_size, self._leases = offset, byte_size, leases

    @property
    def byte_size(self) -> int:
        return self._byte_size

    def write(self, data: Bytes) -> None:
        if data.nbytes > self._byte_size:  # the codec checks first; this is the guard
            raise InvalidInput(
                f"{self._field}: {data.nbytes} bytes do not fit the {self._byte_size} bytes "
                "of its shared memory region"
            )
        if not data.nbytes:
            return
        pointer = self._region.pointer + self._offset
        self._leases.commits.append(
            lambda: self._registry.transfer(
                self._field, self._region, lambda d: d.copy_to_device(pointer, data)
            )
        )


class SharedMemory:
    """Both of Triton's registries behind the lookups the codec makes; a region
    name is unique across the two, as in Triton."""

    def __init__(self, system: SharedMemoryRegistry, cuda: CudaSharedMemoryRegistry) -> None:
        self.system, self.cuda = system, cuda
        system.peer, cuda.peer = cuda, system
        system.names_lock = cuda.names_lock = threading.Lock()

    def input_view(
        self, field_name: str, name: str, offset: int, byte_size: int, leases: Leases
    ) -> memoryview:
        if name in self.cuda:
            return self.cuda.read(field_name, name, offset, byte_size, leases)
        return self.system.view(field_name, name, offset, byte_size, leases)

    def output(
        self, field_name: str, name: str, offset: int, byte_size: int, leases: Leases
    ) -> OutputTarget:
        if name in self.cuda:
            return self.cuda.writer(field_name, name, offset, byte_size, leases)
        return HostOutput(self.system.view(field_name, name, offset, byte_size, leases))

    def close(self) -> None:
        self.system.close()
        self.cuda.close()
