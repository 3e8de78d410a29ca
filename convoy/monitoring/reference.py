"""Reference data: what a model's inputs (and outputs) looked like when it was validated.

Either a `.npz` file in the model directory, one array per input (and optionally per
output) with samples on the first axis, or the first N sampled rows after load
(`first:N`, collected by ReferenceCollector). A bad file fails the model's load with
a ConfigError naming the file and the array at fault; a file holding NaN or
infinite values is refused, and `first:N` leaves such rows out (and counts them):
one of them would make every test against the reference answer NaN, never drift.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelSpec, TensorSpec
from ..errors import ConfigError
from ..tensors import NUMPY_DTYPES, Array

MIN_REFERENCE_ROWS = 20  # fewer cannot support a two-sample test


@dataclass(frozen=True)
class ReferenceData:
    arrays: dict[str, Array]  # tensor name -> [samples, *dims]; BYTES as object arrays
    source: str  # the file, or "first:N"

    def size(self, name: str) -> int:
        array = self.arrays.get(name)
        return 0 if array is None else len(array)


def load_reference(path: Path, spec: ModelSpec) -> ReferenceData:
    """Read and check a reference file against the model's inputs and outputs."""
    where = str(path)
    if not path.is_file():
        raise ConfigError(where, "<file>", "the reference file does not exist")
    if not zipfile.is_zipfile(path):
        raise ConfigError(where, "<file>", "is not a readable .npz file (not a zip archive)")
    raw: dict[str, Array] = {}
    try:
        # allow_pickle=False: a reference file must never run code; BYTES come as S or U arrays.
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                try:
                    raw[name] = npz[name]
                except ValueError:
                    raise ConfigError(
                        where, name, "holds Python objects, which need pickle to read; "
                        "save BYTES tensors as bytes or str arrays"
                    ) from None  # fmt: skip
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(where, "<file>", f"is not a readable .npz file: {exc}") from None
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    arrays: dict[str, Array] = {}
    for name in sorted(raw):
        tensor = tensors.get(name)
        if tensor is None:
            raise ConfigError(
                where, name, f"is neither an input nor an output of model '{spec.name}'"
            )
        arrays[name] = check_reference_array(raw[name], tensor, where)
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in arrays]
    if missing:
        raise ConfigError(where, missing[0], "missing: the reference must hold every input")
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(
            where, min(sizes, key=sizes.__getitem__), f"sample counts differ: {sizes}"
        )
    return ReferenceData(arrays, where)


def check_reference_array(array: Array, tensor: TensorSpec, where: str) -> Array:
    """One reference array, converted to the tensor's dtype; ConfigError names the field."""
    if array.ndim < 1:
        raise ConfigError(where, tensor.name, "needs samples on its first axis")
    if len(array) < MIN_REFERENCE_ROWS:
        raise ConfigError(
            where, tensor.name, f"holds {len(array)} samples; at least {MIN_REFERENCE_ROWS} needed"
        )
    shape = tuple(int(d) for d in array.shape[1:])
    if not tensor.matches(shape):
        raise ConfigError(
            where, tensor.name, f"sample shape {list(shape)} does not fit dims {list(tensor.dims)}"
        )
    if tensor.datatype == "BYTES":
        if array.dtype.kind in "SU":
            # Fixed-width numpy strings become the object arrays of bytes the server uses.
            strings: Array = np.empty(array.shape, dtype=np.object_)
            flat = strings.reshape(-1)
            for i, item in enumerate(array.reshape(-1).tolist()):
                flat[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            return strings
        raise ConfigError(
            where, tensor.name, f"dtype {array.dtype} for a BYTES tensor; save bytes or str arrays"
        )
    dtype = NUMPY_DTYPES[tensor.datatype]
    if not _same_kind(array.dtype, dtype):
        raise ConfigError(where, tensor.name, f"dtype {array.dtype} does not fit {tensor.datatype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ConfigError(where, tensor.name, "holds NaN or infinite values")
    return np.ascontiguousarray(array, dtype=dtype)


def _same_kind(given: np.dtype[np.generic], wanted: np.dtype[np.generic]) -> bool:
    # Integer widths may differ (np.savez of Python ints gives int64); kinds may not.
    if wanted.kind in "iu":
        return given.kind in "iu"
    return given.kind == wanted.kind


def finite_rows(rows: Array) -> Array:
    """Which rows hold only finite values, a boolean per row (integer, BOOL and
    BYTES rows always do)."""
    if rows.dtype.kind not in "fc" or len(rows) == 0:
        return np.ones(len(rows), dtype=np.bool_)
    return np.asarray(np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))


class ReferenceCollector:
    """`first:N`: gathers the first N sampled rows of one tensor whose values are all
    finite, then hands them over; rows holding NaN or infinity are left out, counted."""

    def __init__(self, tensor: TensorSpec, rows: int, source: str) -> None:
        self.tensor = tensor
        self.rows = rows
        self.source = source
        self._parts: list[Array] = []
        self._filled = 0
        self.nonfinite = 0  # rows left out of the reference so far

    @property
    def filled(self) -> int:
        return self._filled

    def add(self, window: Array) -> Array | None:
        """Take rows from a sampled window; the reference array once N rows are in."""
        need = self.rows - self._filled
        if need > 0:
            finite = finite_rows(window)
            # The window's rows up to the one that completes N finite rows: rows past
            # it are not looked at, so they are not counted either.
            end = min(len(window), int(np.searchsorted(np.cumsum(finite), need)) + 1)
            part = window[:end][finite[:end]]
            self.nonfinite += end - len(part)
            self._parts.append(part)
            self._filled += len(part)
        if self._filled < self.rows:
            return None
        return np.concatenate(self._parts)
