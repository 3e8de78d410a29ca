"""Triton's system shared-memory extension: tensors in POSIX shared memory regions.

A client on the same host creates a region (shm_open, e.g. with tritonclient's
`tritonclient.utils.shared_memory`), registers it by name, and then names it in an
input's or output's parameters (`shared_memory_region`, `shared_memory_byte_size`,
`shared_memory_offset`) instead of putting the bytes on the socket. Inputs become
numpy views of the mapping (no copy); outputs are written into it.

Ownership: a region stays mapped while any request holds a lease on it, so an
unregister while in use is refused (the client would otherwise free memory a batch
is reading); every bound is checked before a view is made.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import InvalidInput, RegionInUse, RegionNotFound

# shm_open names: one component, no path tricks (a key must never reach another file).
_KEY = re.compile(r"^/?[A-Za-z0-9_.\-]{1,255}$")
SHM_DIR = Path("/dev/shm")

REGION = "shared_memory_region"
# The region a front end's request names for the raw inputs it moved into its own
# segment (workers/ring.py); it resolves only against that segment.
FRONTEND_INPUTS = "convoy.frontend.inputs"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"


class _Leased(Protocol):
    users: int
    byte_size: int


L = TypeVar("L", bound=_Leased)


def lease(
    regions: Mapping[str, L],
    field_name: str,
    name: str,
    offset: int,
    byte_size: int,
    leases: Leases,
    kind: str,
) -> L:
    """Region `name`, checked to hold byte_size bytes at offset and leased for one
    request (released once it is answered); every error names the request's field."""
    region = regions.get(name)
    if region is None:
        raise InvalidInput(f"{field_name}: shared memory region '{name}' is not registered")
    if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
        raise InvalidInput(
            f"{field_name}: offset {offset} + byte_size {byte_size} is past the end of "
            f"{kind} region '{name}' ({region.byte_size} bytes)"
        )
    region.users += 1
    leases.regions.append(region)
    return region


def removable(regions: Mapping[str, _Leased], name: str, kind: str) -> list[str]:
    """The regions an unregister of `name` removes (every one for ""), checked: an
    unknown name is NOT_FOUND; any in use by a request in flight, FAILED_PRECONDITION
    (the client would otherwise free memory a batch is reading)."""
    names = [name] if name else list(regions)
    if name and name not in regions:
        raise RegionNotFound(f"{kind} region '{name}' is not registered")
    busy = [n for n in names if regions[n].users]
    if busy:
        raise RegionInUse(
            f"{kind} region(s) {busy} in use by requests in flight; "
            "unregister once they are answered"
        )
    return names


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap = field(repr=False)
    users: int = 0  # leases held by requests in flight


class Leased(Protocol):
    """A region of either registry (system or CUDA) as a request leases it."""

    users: int


@dataclass
class Leases:
    """The regions one request reads or writes; released once it is answered.

    `commits` are writes still to be made (outputs bound for CUDA regions): run by
    commit() before the answer goes out, while the regions are still leased."""

    regions: list[Leased] = field(default_factory=list)
    commits: list[Callable[[], None]] = field(default_factory=list)

    def commit(self) -> None:
        commits, self.commits = self.commits, []
        for write in commits:
            write()

    def release(self) -> None:
        for region in self.regions:
            region.users -= 1
        self.regions.clear()
        self.commits.clear()


class SharedMemoryRegistry:
    def __init__(self, directory: Path = SHM_DIR) -> None:
        self._dir = directory
        self._regions: dict[str, Region] = {}
        # The other registry (CUDA): Triton keeps one namespace of region names.
        self.peer: Container[str] | None = None
        # Unregistered mappings that an answered request's arrays still point into:
        # kept mapped (unlinking the object does not invalidate them) until free.
        self._retired: list[mmap.mmap] = []
        # register runs on worker threads: a name is checked and reserved under this
        # lock (shared with the CUDA registry by SharedMemory), then opened outside it.
        self.names_lock = threading.Lock()
        self._opening: set[str] = set()

    def adopt(self, name: str, mapping: mmap.mmap, offset: int, byte_size: int) -> None:
        """A region already mapped by its owner (a front end's ring, see workers/ring.py)."""
        self._regions[name] = Region(name, name, offset, byte_size, mapping)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map the client's object; blocking (run it off the event loop)."""
        if not name:
            raise InvalidInput("shared memory region: name is empty")
        with self.names_lock:
            self._close_retired()
            if name in self or (self.peer is not None and name in self.peer):
                raise InvalidInput(f"shared memory region '{name}' is already registered")
            self._opening.add(name)
        try:
            mapping = self._map(name, key, offset, byte_size)
            with self.names_lock:
                self._regions[name] = Region(name, key, offset, byte_size, mapping)
        finally:
            with self.names_lock:
                self._opening.discard(name)

    def _map(self, name: str, key: str, offset: int, byte_size: int) -> mmap.mmap:
        if not _KEY.match(key):
            raise InvalidInput(f"shared memory region '{name}': key '{key}' is not a valid name")
        if byte_size <= 0:
            raise InvalidInput(f"shared memory region '{name}': byte_size must be positive")
        path = self._dir / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise InvalidInput(
                f"shared memory region '{name}': no shared memory object '{key}'"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"shared memory region '{name}': cannot open '{key}': {exc}"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidInput(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"is past the end of '{key}' ({size} bytes)"
                )
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def __contains__(self, name: object) -> bool:
        return name in self._regions or name in self._opening

    def unregister(self, name: str) -> None:
        """One region, or every region for an empty name; refused while in use."""
        with self.names_lock:
            for region_name in removable(self._regions, name, "shared memory"):
                self._retired.append(self._regions.pop(region_name).mapping)
            self._close_retired()

    def _close_retired(self) -> None:
        still: list[mmap.mmap] = []
        for mapping in self._retired:
            try:
                mapping.close()
            except BufferError:
                still.append(mapping)
        self._retired = still

    def status(self, name: str) -> list[Region]:
        if name and name not in self._regions:
            raise RegionNotFound(f"shared memory region '{name}' is not registered")
        return [self._regions[name]] if name else list(self._regions.values())

    def view(
        self, field_name: str, name: str, offset: int, byte_size: int, leases: Leases
    ) -> memoryview:
        """byte_size bytes at offset into region `name`, leased for this request."""
        region = lease(self._regions, field_name, name, offset, byte_size, leases, "shared memory")
        start = region.offset + offset
        return memoryview(region.mapping)[start : start + byte_size]

    def close(self) -> None:
        self._retired.extend(region.mapping for region in self._regions.values())
        self._regions.clear()
        self._close_retired()
