"""Columns to model inputs: which column feeds which input (by name or --map), checked
against the model before any row is scored, and a record batch's rows turned into the
inputs' tensors, one row at a time refused where its value does not convert.

A column feeds an input of dims D (the item's shape, past the batch dimension):
- a list, fixed-size list or nested list column: each row's values, flattened, must
  number prod(D) (one dimension of D may be -1: the row's count decides it);
- a scalar column: an input of one element (D = [1]);
- numeric columns feed numeric inputs (cast to the input's type; an integer out of the
  input's range is the row's error), booleans BOOL, strings and binaries BYTES.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TensorSpec
from ..tensors import NUMPY_DTYPES, Array
from .engine import ModelSignature

if TYPE_CHECKING:
    import pyarrow as pa


class MappingError(Exception):
    """A column and an input that cannot go together; the message names both."""


@dataclass(frozen=True)
class Binding:
    column: str
    tensor: TensorSpec


def parse_map(pairs: Sequence[str]) -> dict[str, str]:
    """--map COLUMN=INPUT ... as {input: column}."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        column, sep, name = pair.partition("=")
        if not sep or not column or not name:
            raise MappingError(f"--map '{pair}': expected COLUMN=INPUT")
        if name in mapping:
            raise MappingError(f"--map: input '{name}' is mapped twice")
        mapping[name] = column
    return mapping


def plan(schema: pa.Schema, signature: ModelSignature, mapping: Mapping[str, str]) -> list[Binding]:
    """One binding per input fed (every required one); MappingError otherwise."""
    columns = list(schema.names)
    for name, column in mapping.items():
        if signature.input(name) is None:
            raise MappingError(
                f"--map {column}={name}: model '{signature.name}' has no input '{name}' "
                f"(inputs: {', '.join(t.name for t in signature.inputs)})"
            )
        if column not in columns:
            raise MappingError(
                f"--map {column}={name}: the input has no column '{column}' "
                f"(columns: {', '.join(columns)})"
            )
    bindings: list[Binding] = []
    for tensor in signature.inputs:
        fed = mapping.get(tensor.name) or (tensor.name if tensor.name in columns else None)
        if fed is None:
            if tensor.optional:
                continue
            raise MappingError(
                f"model input '{tensor.name}' has no column: the input has none of that "
                f"name (columns: {', '.join(columns)}); use --map COLUMN={tensor.name}"
            )
        _check(fed, schema.field(fed).type, tensor)
        bindings.append(Binding(fed, tensor))
    return bindings


def _check(column: str, kind: pa.DataType, tensor: TensorSpec) -> None:
    import pyarrow as pa

    both = (
        f"column '{column}' ({kind}) cannot feed input '{tensor.name}' "
        f"({tensor.datatype} {list(tensor.dims)})"
    )
    depth, leaf = 0, kind
    sizes: list[int] = []
    while (
        pa.types.is_list(leaf) or pa.types.is_large_list(leaf) or pa.types.is_fixed_size_list(leaf)
    ):
        if pa.types.is_fixed_size_list(leaf):
            sizes.append(leaf.list_size)
        depth += 1
        leaf = leaf.value_type
    if tensor.datatype == "BYTES":
        fits = pa.types.is_string(leaf) or pa.types.is_large_string(leaf) or _is_binary(leaf)
    elif tensor.datatype == "BOOL":
        fits = pa.types.is_boolean(leaf)
    else:
        fits = pa.types.is_integer(leaf) or pa.types.is_floating(leaf)
    if not fits:
        raise MappingError(f"{both}: the values are {leaf}")
    dims = tensor.dims
    fixed = -1 not in dims
    if depth == 0 and math.prod(dims) != 1 and fixed:
        raise MappingError(f"{both}: a scalar column feeds only an input of one element")
    if depth > max(1, len(dims)):
        raise MappingError(f"{both}: {depth} levels of lists for {len(dims)} dimensions")
    if fixed and depth == 1 and sizes and sizes[0] != math.prod(dims):
        raise MappingError(f"{both}: {sizes[0]} values per row, the input takes {math.prod(dims)}")
    if dims.count(-1) > 1 and depth < len(dims):
        raise MappingError(f"{both}: more than one variable dimension needs nested lists")


def _is_binary(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


@dataclass
class Converted:
    """A record batch's rows as tensors: the rows that converted, grouped by the shape
    of their items (a variable dimension makes groups), and the rows that did not."""

    groups: list[tuple[Array, dict[str, Array]]]  # (row positions, inputs)
    errors: dict[int, str]  # row position -> why it did not convert


def convert(batch: pa.RecordBatch | pa.Table, bindings: Sequence[Binding]) -> Converted:
    rows = batch.num_rows
    errors: dict[int, str] = {}
    values: dict[str, tuple[Array, Array]] = {}  # input -> (per-row shapes, flat leaves)
    for binding in bindings:
        column = batch.column(binding.column)
        if hasattr(column, "combine_chunks"):
            column = column.combine_chunks()
        shapes, leaves, bad = _column_values(column, binding.tensor)
        for row, why in bad.items():
            errors.setdefault(
                row, f"column '{binding.column}' -> input '{binding.tensor.name}': {why}"
            )
        values[binding.tensor.name] = (shapes, leaves)
    good = np.array([r for r in range(rows) if r not in errors], dtype=np.int64)
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for row in good.tolist():
        key = tuple(tuple(values[b.tensor.name][0][row]) for b in bindings)
        groups.setdefault(key, []).append(row)
    converted: list[tuple[Array, dict[str, Array]]] = []
    starts = {name: _starts(shapes) for name, (shapes, _) in values.items()}
    for key, members in groups.items():
        positions = np.asarray(members, dtype=np.int64)
        inputs: dict[str, Array] = {}
        for binding, shape in zip(bindings, key, strict=True):
            name = binding.tensor.name
            leaves = values[name][1]
            if len(groups) == 1 and not errors:  # every row, in order: its leaves are all there are
                inputs[name] = leaves.reshape((len(members), *shape))
                continue
            size = math.prod(shape)
            begin: Any = starts[name][positions]
            index = (begin[:, None] + np.arange(size, dtype=np.int64)[None, :]).reshape(-1)
            inputs[name] = leaves[index].reshape((len(members), *shape))
        converted.append((positions, inputs))
    return Converted(converted, errors)


def _starts(shapes: Any) -> Array:
    sizes = np.prod(shapes, axis=1) if shapes.shape[1] else np.ones(len(shapes), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _column_values(column: pa.Array, tensor: TensorSpec) -> tuple[Array, Array, dict[int, str]]:
    """(each row's item shape, the leaves of every row in order, rows refused).

    Leaves of a refused row are dropped, so a good row's leaves stay where its shape says."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fast = _without_nulls(column, tensor)
    if fast is not None:
        return fast
    rows = len(column)
    bad: dict[int, str] = {}
    row_of = np.arange(rows, dtype=np.int64)  # which row each element belongs to
    level_lengths: list[tuple[Array, Array]] = []  # per level: (row of each list, its length)
    array: Any = column
    nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    for row in np.flatnonzero(nulls).tolist():
        bad[row] = "null"
    while (
        pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
    ):
        lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        inner_null = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        for row in np.unique(row_of[inner_null]).tolist():
            bad.setdefault(int(row), "a null list")
        level_lengths.append((row_of, lengths))
        row_of = np.repeat(row_of, lengths)
        array = array.flatten()
    leaf_null = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    for row in np.unique(row_of[leaf_null]).tolist():
        bad.setdefault(int(row), "a null value")
    counts = np.bincount(row_of, minlength=rows)
    shapes = _row_shapes(tensor.dims, counts, level_lengths, rows, bad)
    leaves, leaf_bad = _leaves(array, tensor)
    for row in np.unique(row_of[leaf_bad]).tolist():
        bad.setdefault(int(row), f"a value out of range for {tensor.datatype}")
    if bad:
        keep = ~np.isin(row_of, np.fromiter(bad, dtype=np.int64, count=len(bad)))
        leaves = leaves[keep]
        for row in bad:
            shapes[row] = 0
    return shapes, leaves, bad


def _is_list(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def _without_nulls(
    column: pa.Array, tensor: TensorSpec
) -> tuple[Array, Array, dict[int, str]] | None:
    """_column_values where nothing is null and the lists are one level deep (or fixed-size
    only): a row's count is its list's length, with no bookkeeping per element (a part of
    64x64 images has 12M of them). None where this does not apply."""
    import pyarrow.compute as pc

    rows = len(column)
    counts = np.ones(rows, dtype=np.int64)
    sizes: list[int] = []
    array: Any = column
    while _is_list(array.type):
        if array.null_count:
            return None
        if hasattr(array.type, "list_size"):
            counts *= array.type.list_size
            sizes.append(array.type.list_size)
        elif sizes:  # a variable list below another list: the general path
            return None
        else:
            counts = np.asarray(pc.list_value_length(array).to_numpy(zero_copy_only=False))
            counts = counts.astype(np.int64)
            sizes.append(-1)
        array = array.flatten()
    if array.null_count or column.null_count:
        return None
    bad: dict[int, str] = {}
    dims = tensor.dims
    if len(sizes) > 1 and len(sizes) == len(dims):
        if -1 in sizes:
            return None
        if any(d not in (-1, s) for d, s in zip(dims, sizes, strict=True)):
            why = f"nested lists of shape {sizes}, the input takes {list(dims)}"
            bad = dict.fromkeys(range(rows), why)
        shapes: Array = np.tile(np.asarray(sizes, dtype=np.int64), (rows, 1))
    else:
        shapes = _row_shapes(dims, counts, [], rows, bad)
    leaves, leaf_bad = _leaves(array, tensor)
    if leaf_bad.any():
        row_of = np.repeat(np.arange(rows, dtype=np.int64), counts)
        for row in np.unique(row_of[leaf_bad]).tolist():
            bad.setdefault(int(row), f"a value out of range for {tensor.datatype}")
    if bad:
        refused = np.zeros(rows, dtype=bool)
        refused[list(bad)] = True
        leaves = leaves[np.repeat(~refused, counts)]
        shapes[refused] = 0
    return shapes, leaves, bad


def _row_shapes(
    dims: tuple[int, ...],
    counts: Array,
    levels: list[tuple[Array, Array]],
    rows: int,
    bad: dict[int, str],
) -> Array:
    """Each row's item shape: the input's dims with a variable one filled in."""
    shapes = np.zeros((rows, len(dims)), dtype=np.int64)
    fixed = math.prod(d for d in dims if d != -1)
    variable = [i for i, d in enumerate(dims) if d == -1]
    nested = _nested_shapes(levels, rows) if len(levels) == len(dims) > 1 else None
    for row in range(rows):
        if row in bad:
            continue
        count = int(counts[row])
        if nested is not None:
            shape = nested[row]
            if (shape < 0).any() or any(
                d not in (-1, s) for d, s in zip(dims, shape.tolist(), strict=True)
            ):
                ragged = (
                    "ragged nested lists"
                    if (shape < 0).any()
                    else f"nested lists of shape {shape.tolist()}"
                )
                bad[row] = f"{ragged}, the input takes {list(dims)}"
                continue
            shapes[row] = shape
        elif not variable:
            if count != fixed:
                bad[row] = f"{count} values, the input takes {fixed} ({list(dims)})"
                continue
            shapes[row] = dims
        else:
            if len(variable) > 1 or fixed == 0 or count == 0 or count % fixed:
                bad[row] = f"{count} values do not fill the input's dims {list(dims)}"
                continue
            shape = list(dims)
            shape[variable[0]] = count // fixed
            shapes[row] = shape
    return shapes


def _nested_shapes(levels: list[tuple[Array, Array]], rows: int) -> Array:
    """Each row's shape from its nested lists: per level, the length its lists share
    (-1 where they differ or there are none: ragged)."""
    shapes = np.full((rows, len(levels)), -1, dtype=np.int64)
    for depth, (row_of, lengths) in enumerate(levels):
        # row_of never decreases: each row's lists are one segment
        counts = np.bincount(row_of, minlength=rows)
        present = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
        if len(lengths) == 0:
            continue
        low = np.minimum.reduceat(lengths, starts)
        high = np.maximum.reduceat(lengths, starts)
        shapes[np.flatnonzero(present), depth] = np.where(low == high, low, -1)
    return shapes


def _leaves(array: pa.Array, tensor: TensorSpec) -> tuple[Array, Array]:
    """The leaf values as the input's numpy dtype, and which of them are out of range."""
    import pyarrow as pa

    if tensor.datatype == "BYTES":
        items = array.to_pylist()
        out = np.empty(len(items), dtype=object)
        out[:] = [
            x.encode() if isinstance(x, str) else (x if x is not None else b"") for x in items
        ]
        return out, np.zeros(len(items), dtype=bool)
    dtype = NUMPY_DTYPES[tensor.datatype] if tensor.datatype != "BF16" else np.dtype(np.float32)
    raw = array.fill_null(0) if array.null_count else array
    source = np.asarray(raw.to_numpy(zero_copy_only=False))
    out_of_range = np.zeros(len(source), dtype=bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)  # type: ignore[type-var]
        if pa.types.is_floating(array.type):
            out_of_range = ~np.isfinite(source) | (source != np.trunc(source))
            source = np.where(out_of_range, 0, source)
        out_of_range |= (source < info.min) | (source > info.max)
        source = np.where(out_of_range, 0, source)
    return source.astype(dtype, copy=False), out_of_range
