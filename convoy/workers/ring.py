"""The shared-memory segment a front end and its engine pass large tensors through.

One POSIX shared-memory object per front end, in two halves: requests' input tensors
(placed by the front end, freed by it once the engine has answered) and answers'
output tensors (placed by the engine, freed by the front end once it has copied them
into the gRPC reply). Each half is a `Ring`: allocation in order, frees in any order,
and a full ring is not an error: the tensor then travels inline in the message.

The front end creates the object (`posix_fallocate`, so a full /dev/shm fails here
rather than with SIGBUS on first write); the engine maps it and unlinks its name, so
nothing is left in /dev/shm whichever process dies.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..inference.cuda_shm import CudaSharedMemoryRegistry, SharedMemory
from ..inference.shm import BYTE_SIZE, FRONTEND_INPUTS, OFFSET, REGION, SharedMemoryRegistry
from ..pb import grpc_service_pb2 as pb

SHM_DIR = Path("/dev/shm")
ALIGN = 64  # cache line: tensors the engine views in place start aligned
# Region names in the requests and answers between a front end and its engine; they
# resolve only against that front end's segment, never against a client's regions.
INPUT_REGION = FRONTEND_INPUTS
OUTPUT_REGION = "convoy.frontend.outputs"
INLINE_BELOW = 64 * 1024  # smaller requests and outputs are cheaper inline in the message


@dataclass
class _Block:
    offset: int
    size: int
    live: bool = True


@dataclass
class Ring:
    """A ring allocator over [0, capacity): blocks are placed after the newest one,
    wrapping to the start; space is reclaimed from the oldest block on as blocks are
    freed, in whatever order they are freed."""

    capacity: int
    _blocks: deque[_Block] = field(default_factory=deque)
    _by_offset: dict[int, _Block] = field(default_factory=dict)
    _head: int = 0  # where the next block goes

    def allocate(self, size: int) -> int | None:
        size = max(ALIGN, -(-size // ALIGN) * ALIGN)
        if size > self.capacity:
            return None
        if not self._blocks:
            offset = 0
        else:
            tail = self._blocks[0].offset
            if self._head > tail:  # used: [tail, head); free: [head, end) and [0, tail)
                if self.capacity - self._head >= size:
                    offset = self._head
                elif tail > size:  # strictly: head == tail must mean empty
                    offset = 0
                else:
                    return None
            elif tail - self._head > size:  # wrapped; free: [head, tail)
                offset = self._head
            else:
                return None
        block = _Block(offset, size)
        self._blocks.append(block)
        self._by_offset[offset] = block
        self._head = offset + size
        return offset

    def free(self, offset: int) -> None:
        block = self._by_offset.pop(offset, None)
        if block is None:
            raise KeyError(f"no block at offset {offset}")
        block.live = False
        while self._blocks and not self._blocks[0].live:
            self._blocks.popleft()
        if not self._blocks:
            self._head = 0

    @property
    def live(self) -> int:
        return len(self._by_offset)


@dataclass
class Segment:
    """A mapped shared-memory object: [0, half) inputs, [half, 2 * half) outputs."""

    name: str
    half: int
    mapping: mmap.mmap = field(repr=False)

    @classmethod
    def create(cls, half: int, directory: Path = SHM_DIR) -> Segment:
        name = f"convoy-frontend-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, 2 * half)
            mapping = mmap.mmap(fd, 2 * half)
        except OSError:
            os.unlink(directory / name)
            raise
        finally:
            os.close(fd)
        return cls(name, half, mapping)

    @classmethod
    def attach(cls, name: str, directory: Path = SHM_DIR) -> Segment:
        """The engine's side: map the front end's object, then unlink its name."""
        if "/" in name or not name.startswith("convoy-frontend-"):
            raise ValueError(f"not a front-end segment name: {name!r}")
        fd = os.open(directory / name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
            os.unlink(directory / name)
        return cls(name, size // 2, mapping)

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self.mapping)[offset : offset + size]

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            pass  # an array still views it; the mapping goes when that array does

    def unlink(self, directory: Path = SHM_DIR) -> None:
        """The front end's side, if the engine never attached."""
        try:
            os.unlink(directory / self.name)
        except FileNotFoundError:
            pass


@dataclass
class Placed:
    """Outputs one answer placed in the ring (the engine's side)."""

    ring: EngineRing
    offsets: list[int] = field(default_factory=list)
    nbytes: int = 0

    def __call__(self, nbytes: int) -> tuple[str, int, memoryview] | None:
        if nbytes < INLINE_BELOW:
            return None
        offset = self.ring.outputs.allocate(nbytes)
        if offset is None:
            return None  # full: this output goes inline
        self.offsets.append(offset)
        self.nbytes += nbytes
        segment = self.ring.segment
        return OUTPUT_REGION, offset, segment.view(segment.half + offset, nbytes)


class EngineRing:
    """The engine's view of one front end's segment: inputs through a registry the
    codec reads like any shared memory; outputs placed by `placer()`, freed when the
    front end says it has copied them."""

    def __init__(self, segment: Segment, pid: int) -> None:
        self.segment = segment
        self.pid = pid
        self.outputs = Ring(segment.half)
        registry = SharedMemoryRegistry()
        registry.adopt(INPUT_REGION, segment.mapping, 0, segment.half)
        self.regions = SharedMemory(registry, CudaSharedMemoryRegistry(None))

    def placer(self) -> Placed:
        return Placed(self)

    def free(self, offsets: list[int]) -> None:
        """Every block named; KeyError after the rest are freed if any was not held
        (one bad offset must not keep the others' slots)."""
        unknown = []
        for offset in offsets:
            try:
                self.outputs.free(offset)
            except KeyError:
                unknown.append(offset)
        if unknown:
            raise KeyError(f"no blocks at offsets {unknown}")

    def close(self) -> None:
        self.segment.close()


class FrontendRing:
    """The front end's side: large requests' raw inputs into the segment; answers'
    ring outputs back out, as the bytes of the reply."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.inputs = Ring(segment.half)

    def stage(self, request: pb.ModelInferRequest) -> list[int] | None:
        """Move raw_input_contents into the ring (one copy), naming it in each input's
        parameters; None (request untouched) where it does not apply or fits nowhere."""
        raw = request.raw_input_contents
        if (
            len(raw) != len(request.inputs)
            or any(REGION in t.parameters for t in request.inputs)
            or any(REGION in t.parameters for t in request.outputs)
        ):
            return None  # contents fields, the client's own shared memory: as it came
        offsets: list[int] = []
        for data in raw:
            offset = self.inputs.allocate(len(data))
            if offset is None:
                self.release(offsets)
                return None
            offsets.append(offset)
        for tensor, data, offset in zip(request.inputs, raw, offsets, strict=True):
            self.segment.view(offset, len(data))[:] = data
            tensor.parameters[REGION].string_param = INPUT_REGION
            tensor.parameters[OFFSET].int64_param = offset
            tensor.parameters[BYTE_SIZE].int64_param = len(data)
        del request.raw_input_contents[:]
        return offsets

    def release(self, offsets: list[int]) -> None:
        for offset in offsets:
            self.inputs.free(offset)

    def reply(self, body: bytes) -> tuple[bytes, list[int]]:
        """An answer whose outputs the engine placed in the ring, as the bytes the
        client gets (the outputs copied once, into them), and the offsets to free."""
        response = pb.ModelInferResponse.FromString(body)
        parts: list[bytes | memoryview] = []
        offsets: list[int] = []
        for i, tensor in enumerate(response.outputs):
            params = tensor.parameters
            if REGION in params and params[REGION].string_param == OUTPUT_REGION:
                offset, size = params[OFFSET].int64_param, params[BYTE_SIZE].int64_param
                for key in (REGION, OFFSET, BYTE_SIZE):
                    del params[key]
                offsets.append(offset)
                parts.append(self.segment.view(self.segment.half + offset, size))
            else:
                parts.append(response.raw_output_contents[i])
        del response.raw_output_contents[:]
        # Protobuf messages concatenate: the repeated field's entries appended after the
        # rest of the message, in order, are the same message.
        out: list[bytes | memoryview] = [response.SerializeToString()]
        for part in parts:
            out += [_RAW_OUTPUT_TAG, _varint(len(part)), part]
        return b"".join(out), offsets

    def close(self) -> None:
        self.segment.unlink()
        self.segment.close()


_RAW_OUTPUT_TAG = bytes(
    [pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number << 3 | 2]
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
