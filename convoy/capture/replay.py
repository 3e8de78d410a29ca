"""Captured requests read back for a replay: each row's tensors as numpy arrays of the
exact shapes that were served (the `shapes` column; rows.py describes the layout), and
the labels that arrived for them since.

    <capture-dir>/requests/model=<name>/version=<v>/date=<YYYY-MM-DD>/hour=<HH>/<uuid>.parquet
    <capture-dir>/labels/model=<name>/date=<YYYY-MM-DD>/<uuid>.parquet
        (columns request_id, label, timestamp)

Files are read one at a time, not as one dataset: a model's inputs may change between
versions, and a file's own schema says how its tensors were written. Hidden names (the
writer's `.<uuid>.parquet.tmp`) are never read.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..tensors import Array
from .rows import LOOKED_UP
from .writer import open_filesystem

if TYPE_CHECKING:
    import pyarrow as pa
    from pyarrow.fs import FileSystem

# A replay against a live server that captures is captured too: its request ids carry
# this prefix, and a later replay leaves those rows out (they are not callers' traffic).
REPLAY_ID_PREFIX = "replay:"


class CaptureReadError(Exception):
    """A capture directory or file that cannot be read as the writer writes them."""


@dataclass(frozen=True)
class CapturedRequest:
    """One captured row: what was asked (inputs) and answered (outputs, empty when the
    model captures no outputs or the request failed), in their served shapes."""

    request_id: str
    version: str
    timestamp: dt.datetime  # UTC, when answered
    arm: str
    transport: str
    status: str
    inputs: dict[str, Array] = field(default_factory=dict)
    outputs: dict[str, Array] = field(default_factory=dict)
    hashed: tuple[str, ...] = ()  # inputs written as salted hashes: not replayable


@dataclass(frozen=True)
class Selection:
    """The rows a replay sends, oldest first, and how many were left out, by reason."""

    requests: tuple[CapturedRequest, ...]
    skipped: dict[str, int]


def read_requests(
    uri: str,
    model: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[CapturedRequest]:
    """Every captured row of `model` answered in [since, until), oldest first."""
    fs, root = _requests_root(uri, model)
    rows: list[CapturedRequest] = []
    for path in _files(fs, root):
        parts = _partitions(path[len(root) :])
        if "version" not in parts or not _hour_overlaps(parts, since, until):
            continue
        rows.extend(_read_file(fs, path, parts["version"], since, until))
    rows.sort(key=lambda r: r.timestamp)
    return rows


def read_recent(
    uri: str,
    model: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    max_requests: int | None = None,
) -> tuple[list[CapturedRequest], dict[str, int]]:
    """The replayable rows of `model` answered in [since, until), oldest first, and the
    rows read but left out, by select's reasons (shadow, replay, not_ok, hashed_inputs).

    The window is walked newest hour first and rows are filtered on their Arrow columns
    before any tensor becomes a numpy array; with `max_requests`, reading stops once that
    many replayable rows are held, so a replay of the newest K reads about K rows' worth
    of tensors whatever the window holds (the counts then cover only the hours read)."""
    fs, root = _requests_root(uri, model)
    hours: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for path in _files(fs, root):
        parts = _partitions(path[len(root) :])
        if "version" not in parts or not _hour_overlaps(parts, since, until):
            continue
        hours.setdefault(_hour_key(parts), []).append((path, parts["version"]))
    skipped: Counter[str] = Counter()
    newest_first: list[CapturedRequest] = []
    for key in sorted(hours, reverse=True):
        need = None if max_requests is None else max_requests - len(newest_first)
        if need is not None and need <= 0:
            break
        held: list[tuple[pa.Table, str, str]] = []
        for path, version in hours[key]:
            table = _filtered(fs, path, since, until, skipped)
            if table.num_rows:
                held.append((table, path, version))
        if need is not None:
            held = _newest(held, need)
        rows: list[CapturedRequest] = []
        for table, path, version in held:
            rows.extend(_convert(table, path, version))
        rows.sort(key=lambda r: r.timestamp, reverse=True)
        newest_first.extend(rows if need is None else rows[:need])
    newest_first.reverse()
    return newest_first, dict(skipped)


def select(
    rows: Iterable[CapturedRequest],
    required: Iterable[str] = (),
    max_requests: int | None = None,
) -> Selection:
    """The rows worth replaying: callers' requests that were answered (OK), with every
    input the model requires captured as it was sent; the most recent `max_requests`."""
    needed = frozenset(required)
    skipped: Counter[str] = Counter()
    chosen: list[CapturedRequest] = []
    for row in rows:
        if row.arm == "shadow":  # a mirrored run: its caller's row is the request
            skipped["shadow"] += 1
        elif row.transport == "replay" or row.request_id.startswith(REPLAY_ID_PREFIX):
            skipped["replay"] += 1
        elif row.status != "OK":
            skipped["not_ok"] += 1
        elif row.hashed:
            skipped["hashed_inputs"] += 1
        elif not needed <= row.inputs.keys():
            skipped["missing_inputs"] += 1
        else:
            chosen.append(row)
    if max_requests is not None and len(chosen) > max_requests:
        skipped["over_max_requests"] = len(chosen) - max_requests
        chosen = chosen[len(chosen) - max_requests :]
    return Selection(tuple(chosen), dict(skipped))


def read_labels(uri: str, model: str) -> dict[str, Any] | None:
    """request_id -> its latest label (by `timestamp`; labels of one instant by their
    kind and text, as the dataset export picks them); None when the model has no labels
    folder at all (no labels are being collected).

    Where a file has the Feedback RPC's `kind` and `value` columns, a label is read as
    what it was sent as: a class index (int), a value (float) or a class label (text)."""
    import pyarrow.parquet as pq

    try:
        fs, base = open_filesystem(uri)
        root = f"{base}/labels/model={model}"
        if fs.get_file_info(root).type.name != "Directory":
            return None
    except (OSError, ValueError) as exc:
        raise CaptureReadError(f"{uri}: cannot open: {exc}") from None
    latest: dict[str, tuple[tuple[float, str, str], Any]] = {}
    for path in _files(fs, root):
        try:
            with fs.open_input_file(path) as source:
                table = pq.ParquetFile(source).read()
            ids = table.column("request_id").to_pylist()
            labels = table.column("label").to_pylist()
            stamps = [_seconds(t) for t in table.column("timestamp").to_pylist()]
        except (OSError, KeyError, ValueError) as exc:
            raise CaptureReadError(f"{path}: not a labels file: {exc}") from None
        names = set(table.column_names)
        kinds = table.column("kind").to_pylist() if "kind" in names else [""] * len(ids)
        values = table.column("value").to_pylist() if "value" in names else [None] * len(ids)
        for request_id, label, stamp, kind, value in zip(
            ids, labels, stamps, kinds, values, strict=True
        ):
            if request_id is None or label is None:
                continue
            key = (stamp, kind or "", str(label))
            held = latest.get(request_id)
            if held is None or key >= held[0]:
                latest[request_id] = (key, _typed_label(label, kind, value))
    return {request_id: label for request_id, (_, label) in latest.items()}


def _typed_label(label: Any, kind: str | None, value: float | None) -> Any:
    if kind == "class_index" and value is not None:
        return int(value)
    if kind == "value" and value is not None:
        return float(value)
    return label


# -- files and partitions ------------------------------------------------------------------


def _files(fs: FileSystem, root: str) -> list[str]:
    from pyarrow.fs import FileSelector

    try:
        found = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise CaptureReadError(f"{root}: cannot list: {exc}") from None
    return sorted(
        info.path
        for info in found
        if info.type.name == "File"
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    )


def _partitions(relative: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in relative.strip("/").split("/") if "=" in p)


def _hour_overlaps(
    parts: Mapping[str, str], since: dt.datetime | None, until: dt.datetime | None
) -> bool:
    """Whether a date/hour partition can hold rows of the window (skip the others unread)."""
    try:
        day = dt.date.fromisoformat(parts["date"])
        start = dt.datetime(day.year, day.month, day.day, int(parts["hour"]), tzinfo=dt.UTC)
    except (KeyError, ValueError):
        return True  # not the writer's layout: read it and filter by timestamp
    end = start + dt.timedelta(hours=1)
    return (since is None or end > since) and (until is None or start < until)


def _requests_root(uri: str, model: str) -> tuple[FileSystem, str]:
    try:
        fs, base = open_filesystem(uri)
    except (OSError, ValueError) as exc:
        raise CaptureReadError(f"{uri}: cannot open: {exc}") from None
    return fs, f"{base}/requests/model={model}"


def _hour_key(parts: Mapping[str, str]) -> tuple[int, str]:
    """Orders hour partitions, newest last; a file outside the writer's layout sorts
    after every hour, so it is always read."""
    try:
        day = dt.date.fromisoformat(parts["date"])
        return (0, f"{day.isoformat()}T{int(parts['hour']):02d}")
    except (KeyError, ValueError):
        return (1, "")


def _read_table(fs: FileSystem, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as source:
            return pq.ParquetFile(source).read()
    except (OSError, ValueError) as exc:
        raise CaptureReadError(f"{path}: cannot read as Parquet: {exc}") from None


def _in_window(
    table: pa.Table, path: str, since: dt.datetime | None, until: dt.datetime | None
) -> pa.Table:
    import pyarrow.compute as pc

    try:
        if since is not None:
            table = table.filter(pc.greater_equal(table.column("timestamp"), _scalar(since)))
        if until is not None:
            table = table.filter(pc.less(table.column("timestamp"), _scalar(until)))
    except (KeyError, ValueError, TypeError) as exc:
        raise CaptureReadError(f"{path}: not a capture file as Convoy writes them: {exc}") from None
    return table


def _convert(table: pa.Table, path: str, version: str) -> list[CapturedRequest]:
    if table.num_rows == 0:
        return []
    try:
        return _rows_of(table, version)
    except (KeyError, ValueError, TypeError) as exc:
        raise CaptureReadError(f"{path}: not a capture file as Convoy writes them: {exc}") from None


def _read_file(
    fs: FileSystem,
    path: str,
    version: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> list[CapturedRequest]:
    table = _in_window(_read_table(fs, path), path, since, until)
    return _convert(table, path, version)


def _filtered(
    fs: FileSystem,
    path: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    skipped: Counter[str],
) -> pa.Table:
    """The file's replayable rows of the window, still Arrow; the others counted in
    `skipped` under select's reasons, in its order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _in_window(_read_table(fs, path), path, since, until)
    if table.num_rows == 0:
        return table
    try:
        keep = pa.array([True] * table.num_rows)
        ids = pc.fill_null(table.column("request_id"), "")
        reasons = [
            ("shadow", pc.equal(pc.fill_null(table.column("arm"), ""), "shadow")),
            (
                "replay",
                pc.or_(
                    pc.equal(pc.fill_null(table.column("transport"), ""), "replay"),
                    pc.starts_with(ids, REPLAY_ID_PREFIX),
                ),
            ),
            ("not_ok", pc.not_equal(pc.fill_null(table.column("status"), ""), "OK")),
            ("hashed_inputs", _hashed_mask(table)),
        ]
        for reason, out in reasons:
            dropped = pc.and_(keep, pc.fill_null(out, False))
            count = pc.sum(dropped).as_py() or 0
            if count:
                skipped[reason] += count
                keep = pc.and_(keep, pc.invert(dropped))
        return table.filter(keep)
    except (KeyError, ValueError, TypeError) as exc:
        raise CaptureReadError(f"{path}: not a capture file as Convoy writes them: {exc}") from None


def _hashed_mask(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """Rows holding an input written as a salted hash (a string leaf, as _tensors reads)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask: Any = pa.array([False] * table.num_rows)
    if "inputs" not in table.column_names:
        return mask
    struct = table.column("inputs").combine_chunks()
    for index in range(struct.type.num_fields):
        leaf = struct.type.field(index).type
        while pa.types.is_list(leaf) or pa.types.is_fixed_size_list(leaf):
            leaf = leaf.value_type
        if pa.types.is_string(leaf) or pa.types.is_large_string(leaf):
            mask = pc.or_(mask, struct.field(index).is_valid())
    return mask


def _newest(held: list[tuple[pa.Table, str, str]], need: int) -> list[tuple[pa.Table, str, str]]:
    """The files' rows down to the `need` newest of them all (ties at the cut kept)."""
    import pyarrow.compute as pc

    stamps = sorted(
        (t for table, _, _ in held for t in table.column("timestamp").to_pylist() if t),
        reverse=True,
    )
    if len(stamps) <= need:
        return held
    cut = _scalar(stamps[need - 1])
    out = []
    for table, path, version in held:
        kept = table.filter(pc.greater_equal(table.column("timestamp"), cut))
        if kept.num_rows:
            out.append((kept, path, version))
    return out


def _scalar(when: dt.datetime) -> pa.Scalar:
    import pyarrow as pa

    return pa.scalar(when, pa.timestamp("us", tz="UTC"))


def _rows_of(table: pa.Table, version: str) -> list[CapturedRequest]:
    n = table.num_rows
    shapes = table.column("shapes").combine_chunks()
    inputs: dict[str, list[Array | None]] = {}
    hashed: dict[str, list[bool]] = {}
    first_output = 0
    if "inputs" in table.column_names:
        struct = table.column("inputs").combine_chunks()
        inputs, hashed = _tensors(struct, shapes, 0)
        first_output = struct.type.num_fields
    outputs, _ = _tensors(table.column("outputs").combine_chunks(), shapes, first_output)
    ids = table.column("request_id").to_pylist()
    stamps = table.column("timestamp").to_pylist()
    arms = table.column("arm").to_pylist()
    transports = table.column("transport").to_pylist()
    statuses = table.column("status").to_pylist()
    return [
        CapturedRequest(
            request_id=ids[i],
            version=version,
            timestamp=stamps[i],
            arm=arms[i],
            transport=transports[i],
            status=statuses[i],
            inputs={k: v[i] for k, v in inputs.items() if v[i] is not None},  # type: ignore[misc]
            outputs={k: v[i] for k, v in outputs.items() if v[i] is not None},  # type: ignore[misc]
            hashed=tuple(sorted(k for k, present in hashed.items() if present[i])),
        )
        for i in range(n)
    ]


def _tensors(
    struct: pa.StructArray, shapes: pa.StructArray, first_shape: int
) -> tuple[dict[str, list[Array | None]], dict[str, list[bool]]]:
    """Each tensor field of a struct column as one array (or None) per row, and the
    hashed inputs (capture_hash: hex digests, not what was sent) with the rows that
    hold one. Shapes are matched by position: the `shapes` struct lists the inputs,
    then the outputs (an input and an output may share a name)."""
    import pyarrow as pa

    tensors: dict[str, list[Array | None]] = {}
    hashed: dict[str, list[bool]] = {}
    for index in range(struct.type.num_fields):
        name = struct.type.field(index).name
        if LOOKED_UP.encode() in (struct.type.field(index).metadata or {}):
            continue  # a feature the server looked up: the replay's server looks it up again
        column = struct.field(index)
        valid = column.is_valid().to_pylist()
        leaves = column
        while pa.types.is_list(leaves.type) or pa.types.is_fixed_size_list(leaves.type):
            leaves = leaves.flatten()  # a null row contributes no values
        if pa.types.is_string(leaves.type) or pa.types.is_large_string(leaves.type):
            hashed[name] = valid
            continue
        sizes = shapes.field(first_shape + index).to_pylist()
        tensors[name] = _split(name, valid, sizes, _numpy(leaves))
    return tensors, hashed


def _numpy(leaves: pa.Array) -> Array:
    import pyarrow as pa

    if pa.types.is_binary(leaves.type) or pa.types.is_large_binary(leaves.type):
        out = np.empty(len(leaves), dtype=object)
        out[:] = leaves.to_pylist()
        return out
    return np.asarray(leaves.to_numpy(zero_copy_only=False))


def _split(
    name: str, valid: Sequence[bool], shapes: Sequence[list[int] | None], values: Array
) -> list[Array | None]:
    out: list[Array | None] = []
    start = 0
    for present, shape in zip(valid, shapes, strict=True):
        if not present or shape is None:
            out.append(None)
            continue
        size = math.prod(shape)
        if start + size > len(values):
            raise ValueError(f"tensor '{name}': shapes ask for more values than it holds")
        out.append(values[start : start + size].reshape(shape))
        start += size
    if start != len(values):
        raise ValueError(f"tensor '{name}': {len(values) - start} values past its shapes")
    return out


def _seconds(value: object) -> float:
    """A label's timestamp (datetime, number or missing) as seconds, for ordering."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return aware.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return -math.inf
