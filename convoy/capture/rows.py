"""Captured rows: what the event loop keeps of a request, and how a batch of them becomes an
Arrow table (on the writer's thread).

One row per captured request. Its tensors go in two struct columns, `inputs` and
`outputs`, one field per tensor, with the tensor's Triton shape in the field's metadata
(`shape`, -1 where a dimension varies; `batched`: whether a batch dimension comes first):

- a batching model's tensor: a list with one item per batch row; the item is a
  fixed-size list of the row's values (flattened) when the dims are fixed, else a list;
- a model without a batch dimension: the tensor's values (flattened), as a fixed-size
  list when the dims are fixed, else a list;
- numeric values in their dtype (BF16 as its uint16 bit pattern), BYTES as binary,
  an input named in `capture_hash` as the hex of its salted SHA-256, one per element.

The struct column `shapes` keeps each captured tensor's whole shape (list<int64>), so a
replay sends exactly what was served whatever the dims.

Labels (the Feedback RPC's true labels) are rows of their own, one per accepted feedback,
in LABEL_COLUMNS: whatever the label's kind, `label` holds it as text (a class index in
decimal, a regression value as Python's repr of the double, which reads back to the same
double, a class label as sent), `kind` says which it was (the FeedbackRequest oneof:
class_index, value, class_label) and `value` holds it as a double where it is a number.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelSpec, TensorSpec
from ..tensors import NUMPY_DTYPES
from .arena import joined

if TYPE_CHECKING:
    import pyarrow as pa

# The columns of a file besides inputs, outputs and shapes. `model` and `version` are not
# among them: they are partition keys (model=<name>/version=<v> in the path), which every
# Hive-aware reader (DuckDB, pyarrow.dataset, pandas, Spark) adds as columns; a file that
# held them too would clash with them (pyarrow refuses a string beside an int partition).
SCALARS = (
    "request_id", "timestamp", "arm", "transport", "status", "error",
    "queue_us", "compute_us", "total_us", "cache_hit", "client",
)  # fmt: skip


# One captured request: the values of SCALARS in that order (the timestamp in UTC
# microseconds since the epoch, the status as the gRPC code name), then each input's
# tensor in the config's order (None: not kept), then each output's. A flat tuple of
# strings, numbers and arrays, which the collector stops tracking after one pass: rows
# buffered as objects with dicts (seconds' worth, tens of thousands) were what its older
# generations walked on every collection, 4.5 of 9 µs per tiny row on the loop.
Row = tuple[Any, ...]


# Field metadata of an `inputs` field the server looked up (a feature), not sent.
LOOKED_UP = "looked_up"

LABEL_COLUMNS = ("request_id", "label", "kind", "value", "version", "timestamp")


@dataclass(frozen=True, slots=True)
class CapturedLabel:
    """One accepted feedback: the true label of an earlier request."""

    model: str
    version: str  # the version that answered the request
    request_id: str
    label: str  # the label as text, whatever its kind
    kind: str  # class_index | value | class_label
    value: float | None  # the label as a number; None for a class label
    timestamp_us: int  # UTC microseconds since the epoch: when the label was accepted

    @classmethod
    def of(
        cls, model: str, version: str, request_id: str, label: int | float | str, timestamp_us: int
    ) -> CapturedLabel:
        if isinstance(label, str):
            return cls(model, version, request_id, label, "class_label", None, timestamp_us)
        if isinstance(label, float):
            return cls(model, version, request_id, repr(label), "value", label, timestamp_us)
        text = str(int(label))
        return cls(model, version, request_id, text, "class_index", float(label), timestamp_us)

    @property
    def nbytes(self) -> int:  # for the writer's budget
        return 256 + len(self.request_id) + len(self.label)


def labels_table(labels: Sequence[CapturedLabel]) -> pa.Table:
    """Labels of one model as one Arrow table (the writer's thread)."""
    import pyarrow as pa

    return pa.table(
        {
            "request_id": pa.array([x.request_id for x in labels], pa.string()),
            "label": pa.array([x.label for x in labels], pa.string()),
            "kind": pa.array([x.kind for x in labels], pa.string()),
            "value": pa.array([x.value for x in labels], pa.float64()),
            "version": pa.array([x.version for x in labels], pa.string()),
            "timestamp": pa.array([x.timestamp_us for x in labels], pa.timestamp("us", tz="UTC")),
        }
    )


def hashed(values: np.ndarray[Any, Any], salt: bytes) -> np.ndarray[Any, Any]:
    """Each element as the hex of SHA-256(salt + its bytes): joinable, not reversible."""
    out = np.empty(values.shape, dtype=object)
    flat, target = values.reshape(-1), out.reshape(-1)
    for i, value in enumerate(flat):
        raw = value if isinstance(value, bytes) else np.asarray(value).tobytes()
        target[i] = hashlib.sha256(salt + raw).hexdigest()
    return out


class PendingRows:
    """One model version's rows (of one config) not yet written, gathered by the
    writer's thread from what the loop put, and turned into columns there."""

    __slots__ = ("breaks", "rows", "spec", "version")

    def __init__(self, spec: ModelSpec, version: str) -> None:
        self.spec = spec
        self.version = version
        self.rows: list[Row] = []
        # Where a row's tensors began a new arena chunk: each segment's values lie end
        # to end in one chunk, and become Arrow columns without a copy (arena.joined).
        self.breaks: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)


def table(pending: PendingRows) -> pa.Table:
    """The rows of one model version as one Arrow table (the writer's thread): a chunk
    per segment (PendingRows.breaks)."""
    import pyarrow as pa

    rows, breaks = pending.rows, [b for b in pending.breaks if 0 < b < len(pending.rows)]
    if not breaks:
        return _table(pending.spec, rows)
    bounds = [0, *breaks, len(rows)]
    return pa.concat_tables(
        [_table(pending.spec, rows[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    )


def _table(spec: ModelSpec, rows: list[Row]) -> pa.Table:
    import pyarrow as pa

    capture = spec.capture
    hashed_names = capture.hashed if capture is not None else frozenset()
    excluded = capture.exclude if capture is not None else frozenset()
    values = list(zip(*rows, strict=True))  # one tuple per column, in C
    scalars = dict(zip(SCALARS, values, strict=False))
    names = [t.name for t in (*spec.captured_inputs, *spec.outputs)]
    tensors = {n: list(column) for n, column in zip(names, values[len(SCALARS) :], strict=True)}
    columns: dict[str, pa.Array] = {
        "request_id": pa.array(_ids(scalars["request_id"]), pa.string()),
        "timestamp": pa.array(scalars["timestamp"], pa.timestamp("us", tz="UTC")),
        "arm": pa.array(scalars["arm"], pa.string()),
        "transport": pa.array(scalars["transport"], pa.string()),
        "status": pa.array(scalars["status"], pa.string()),
        "error": pa.array(scalars["error"], pa.string()),
        "queue_us": pa.array(scalars["queue_us"], pa.int64()),
        "compute_us": pa.array(scalars["compute_us"], pa.int64()),
        "total_us": pa.array(scalars["total_us"], pa.int64()),
        "cache_hit": pa.array(scalars["cache_hit"], pa.bool_()),
        "client": pa.array(scalars["client"], pa.string()),
    }
    inputs = [t for t in spec.captured_inputs if t.name not in excluded]
    # Parquet holds no struct without fields: with every input excluded, no `inputs`.
    if inputs:
        # Looked-up features are marked: a replay sends the entity keys, not them.
        looked_up = frozenset(t.name for t in spec.features.captured) if spec.features else None
        columns["inputs"] = _struct(
            [(t, t.name in hashed_names, tensors[t.name]) for t in inputs],
            spec.batched,
            looked_up,
        )
    outputs = [(t, False, tensors[t.name]) for t in spec.outputs]
    columns["outputs"] = _struct(outputs, spec.batched)
    shapes = [(t.name, tensors[t.name]) for t in (*inputs, *spec.outputs)]
    columns["shapes"] = pa.StructArray.from_arrays(
        [_shape_column(column) for _, column in shapes], names=[name for name, _ in shapes]
    )
    return pa.table(columns)


def _ids(given: Sequence[str]) -> Sequence[str]:
    """Each row's request id; a request sent without one gets one here, off the loop, so
    rows stay distinct (labels join by the id the client sent: one that wants labels
    sends one). One random 128-bit base per table plus the row's index, written as
    uuid4().hex is: a uuid4 per row was a getrandom call per row, each releasing the GIL
    and taking it back from the event loop (a flush of 20,000 such rows cost tiny 8 % of
    its throughput)."""
    if all(given):
        return given
    base = uuid.uuid4().int
    return [r or f"{(base + i) & _ID_MASK:032x}" for i, r in enumerate(given)]


_ID_MASK = (1 << 128) - 1


def _struct(
    tensors: Iterable[tuple[TensorSpec, bool, list[np.ndarray[Any, Any] | None]]],
    batched: bool,
    looked_up: frozenset[str] | None = None,
) -> pa.Array:
    import pyarrow as pa

    arrays, fields = [], []
    for spec, is_hashed, values in tensors:
        array = _tensor_column(spec, is_hashed, values, batched)
        metadata = {"shape": json.dumps(list(spec.dims)), "batched": json.dumps(batched)}
        if looked_up and spec.name in looked_up:
            metadata[LOOKED_UP] = "true"
        fields.append(pa.field(spec.name, array.type, metadata=metadata))
        arrays.append(array)
    return pa.StructArray.from_arrays(arrays, fields=fields)


def _value_type(spec: TensorSpec, is_hashed: bool) -> pa.DataType:
    import pyarrow as pa

    if is_hashed:
        return pa.string()
    if spec.datatype == "BYTES":
        return pa.binary()
    return pa.from_numpy_dtype(NUMPY_DTYPES[spec.datatype])


def _tensor_column(
    spec: TensorSpec, is_hashed: bool, values: list[np.ndarray[Any, Any] | None], batched: bool
) -> pa.Array:
    """One tensor of every row: nulls where a row has none (refused, or not asked for)."""
    import pyarrow as pa

    value_type = _value_type(spec, is_hashed)
    fixed = -1 not in spec.dims
    per_item = int(np.prod(spec.dims)) if fixed else 0
    present = [v for v in values if v is not None]
    if value_type in (pa.binary(), pa.string()):
        leaves = pa.array([x for v in present for x in v.reshape(-1).tolist()], value_type)
    elif present:
        leaves = pa.array(_flat(present), value_type)
    else:
        leaves = pa.array([], value_type)
    mask = _nulls(values, len(present))
    if batched:
        # One item per batch row: a row's values are the elements past the batch dim.
        if fixed:
            inner: pa.Array = pa.FixedSizeListArray.from_arrays(leaves, per_item)
        else:
            items = [n for v in present for n in [math.prod(v.shape[1:])] * v.shape[0]]
            inner = pa.ListArray.from_arrays(_offsets(items), leaves)
        counts = [0 if v is None else v.shape[0] for v in values]
        return pa.ListArray.from_arrays(_offsets(counts), inner, mask=mask)
    if fixed:
        whole = [per_item if v is not None else 0 for v in values]
        full = _fill_nulls(leaves, whole, per_item, value_type)
        return pa.FixedSizeListArray.from_arrays(full, per_item, mask=mask)
    counts = [0 if v is None else v.size for v in values]
    return pa.ListArray.from_arrays(_offsets(counts), leaves, mask=mask)


def _flat(arrays: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """Every value of the arrays in order, in one array: the arena chunk they lie in end
    to end, else joined along the first dim where the rest agree (no per-row reshape),
    else flattened one by one."""
    together = joined(arrays)
    if together is not None:
        return together
    try:
        return np.concatenate(arrays).reshape(-1)
    except ValueError:  # dims that differ past the first, or a 0-d array
        return np.concatenate([v.reshape(-1) for v in arrays])


def _nulls(values: list[np.ndarray[Any, Any] | None], present: int) -> pa.Array | None:
    """The null mask of a column; None (no mask to build) when every row has a value
    (`present` of them do: `None in values` would compare arrays with ==)."""
    import pyarrow as pa

    if present == len(values):
        return None
    return pa.array([v is None for v in values], pa.bool_())


def _shape_column(values: list[np.ndarray[Any, Any] | None]) -> pa.Array:
    """Each tensor's shape as list<int64> (null where a row has none), built from flat
    numbers: the writer's thread holds the GIL the event loop needs while it works."""
    import pyarrow as pa

    shapes = [v.shape for v in values if v is not None]
    counts = [0 if v is None else v.ndim for v in values]
    try:  # every shape of one length (a batching model's tensors): one array, in C
        flat = np.array(shapes, np.int64).reshape(-1)
    except ValueError:
        flat = np.fromiter((d for shape in shapes for d in shape), np.int64)
    return pa.ListArray.from_arrays(
        _offsets(counts), pa.array(flat, pa.int64()), mask=_nulls(values, len(shapes))
    )


def _fill_nulls(
    leaves: pa.Array, sizes: list[int], per_item: int, value_type: pa.DataType
) -> pa.Array:
    """A fixed-size list holds per_item values for a null row too: fill those in."""
    import pyarrow as pa

    if all(sizes):
        return leaves
    parts, start = [], 0
    for size in sizes:
        if size:
            parts.append(leaves.slice(start, size))
            start += size
        else:
            parts.append(pa.nulls(per_item, value_type))
    return pa.concat_arrays(parts)


def _offsets(counts: list[int]) -> pa.Array:
    import pyarrow as pa

    return pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
