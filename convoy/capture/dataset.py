"""Dataset export: one model's captured requests, each with its latest label, as one
Parquet file and a manifest naming it by a hash of its content (DESIGN §12).

    PATH                  the rows, in a canonical order (timestamp, request_id, version,
                          arm, then the row's own digest), with `model` and `version` as
                          columns: one file, no partitions
    PATH.manifest.json    dataset_id, rows, versions, since, until, label_coverage, schema,
                          the command

`dataset_id` is the SHA-256 of the schema's text and of each row's digest in that order;
a row's digest is the SHA-256 of its values as canonical JSON. It depends on what the rows
hold, never on the names, number or write order of the files they came from: the same
command over the same captured files names the same dataset.

Only callers' answered requests are exported (status OK): a refused request has no answer
to learn from, and the server's own replay traffic (the rollout replay gate's and `convoy
replay --server`'s requests: transport `replay`, request ids `replay:...`) is not callers'.
Every arm is (a shadow run is a row of its own, of the candidate's version); the
`arm` and `version` columns tell them apart. Labels are joined whenever they arrived,
--since and --until select requests only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .writer import open_filesystem

if TYPE_CHECKING:
    import pyarrow as pa
    from pyarrow.fs import FileSystem

STATUS = "OK"
REPLAY_TRANSPORT = "replay"
REPLAY_ID_PREFIX = "replay:"  # replay.REPLAY_ID_PREFIX
SORT_KEYS = ("timestamp", "request_id", "version", "arm")
# What --with-labels adds to each row: the latest label's columns (rows.py LABEL_COLUMNS).
LABEL_COLUMNS = {"label": "label", "kind": "label_kind", "value": "label_value",
                 "timestamp": "label_timestamp"}  # fmt: skip
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_AGE_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ExportError(Exception):
    """Why no dataset was written; `flag` names the argument at fault (a usage error)."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.flag = flag


@dataclass(frozen=True)
class Instant:
    """A --since or --until as given: an absolute time, or an age before now."""

    text: str
    at: dt.datetime | None = None  # UTC
    age: dt.timedelta | None = None

    def resolve(self, now: dt.datetime) -> dt.datetime:
        if self.at is not None:
            return self.at
        assert self.age is not None
        return now - self.age


def resolve_window(
    since: Instant | None, until: Instant | None, now: dt.datetime
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """--since and --until as times, ages counted back from one `now` (None: open)."""
    return (
        since.resolve(now) if since is not None else None,
        until.resolve(now) if until is not None else None,
    )


def parse_instant(text: str) -> Instant:
    """ISO 8601 (a date is its midnight; no zone is UTC) or an age: 90s, 30m, 24h, 7d, 2w.
    ValueError saying what is accepted."""
    age = _AGE.match(text.strip())
    if age is not None:
        return Instant(text, age=dt.timedelta(**{_AGE_UNIT[age.group(2)]: float(age.group(1))}))
    try:
        at = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"'{text}' is not an ISO 8601 time (2026-12-01, 2026-12-01T08:00:00Z) "
            "or an age (90s, 30m, 24h, 7d, 2w)"
        ) from None
    at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
    return Instant(text, at=at)


@dataclass(frozen=True)
class ExportRequest:
    model: str
    capture_dir: str  # a directory or a pyarrow filesystem URI
    out: str  # the same
    since: dt.datetime | None = None  # inclusive
    until: dt.datetime | None = None  # exclusive
    versions: tuple[str, ...] = ()  # none: every version
    with_labels: bool = False
    command: str = ""  # recorded in the manifest


@dataclass(frozen=True)
class Exported:
    path: str
    manifest_path: str
    manifest: dict[str, Any]


def export(request: ExportRequest) -> Exported:
    """Read, join, order, name and write one dataset (blocking file I/O)."""
    if request.since and request.until and request.since >= request.until:
        raise ExportError(
            f"--since {iso(request.since)} is not before --until {iso(request.until)}", "--since"
        )
    try:
        filesystem, base = open_filesystem(request.capture_dir)
        if filesystem.get_file_info(base).type.name != "Directory":
            raise ExportError(f"'{request.capture_dir}' is not a directory", "--capture-dir")
        rows = read_requests(filesystem, base, request)
        labels = read_labels(filesystem, base, request.model) if request.with_labels else None
    except (OSError, ValueError, KeyError) as exc:  # ArrowInvalid is a ValueError
        raise ExportError(
            f"cannot read the captured files in '{request.capture_dir}': {exc}", "--capture-dir"
        ) from None
    coverage = None
    if labels is not None:
        rows = join_labels(rows, labels)
        coverage = (rows.num_rows - rows.column("label").null_count) / rows.num_rows
    rows, dataset_id = canonical(rows)
    versions = sorted(set(rows.column("version").to_pylist()), key=version_order)
    manifest: dict[str, Any] = {
        "dataset_id": dataset_id,
        "model": request.model,
        "rows": rows.num_rows,
        "versions": versions,
        "since": iso(request.since) if request.since else None,
        "until": iso(request.until) if request.until else None,
        "status": STATUS,
        "with_labels": request.with_labels,
        "label_coverage": coverage,
        "schema": schema_of(rows),
        "command": request.command,
    }
    path, manifest_path = write(rows, manifest, request.out)
    return Exported(path, manifest_path, manifest)


# -- reading -------------------------------------------------------------------------------


def read_requests(filesystem: FileSystem, base: str, request: ExportRequest) -> pa.Table:
    """The model's answered requests in the window, `model` and `version` as columns.
    Files of different schemas (a config that gained an input) are read as one: their
    columns and tensor fields unified, absent ones null."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    root = f"{base}/requests/model={request.model}"
    if filesystem.get_file_info(root).type.name != "Directory":
        raise ExportError(f"no captured requests of model '{request.model}' in {base}")
    keys = pa.schema([("version", pa.string()), ("date", pa.string()), ("hour", pa.string())])
    partitioning = ds.HivePartitioning(keys, segment_encoding="none")
    found = ds.dataset(root, filesystem=filesystem, format="parquet", partitioning=partitioning)
    # Callers' answered requests: the replay gate's and `convoy replay --server`'s own
    # requests (transport replay, ids replay:...) are the server's, not traffic.
    where = (
        (pc.field("status") == STATUS)
        & (pc.field("transport") != REPLAY_TRANSPORT)
        & ~pc.starts_with(pc.field("request_id"), REPLAY_ID_PREFIX)
    )
    by_path = None  # the partitions that may hold rows: only their files are opened
    if request.versions:
        by_path = pc.field("version").isin(list(request.versions))
    if request.since is not None:
        stamp = pa.scalar(request.since, pa.timestamp("us", tz="UTC"))
        where &= pc.field("timestamp") >= stamp
        by_path = _and(by_path, pc.field("date") >= f"{request.since:%Y-%m-%d}")
    if request.until is not None:
        stamp = pa.scalar(request.until, pa.timestamp("us", tz="UTC"))
        where &= pc.field("timestamp") < stamp
        by_path = _and(by_path, pc.field("date") <= f"{request.until:%Y-%m-%d}")
    fragments = list(found.get_fragments(filter=by_path))
    if not fragments:
        raise ExportError(_no_rows(request))
    schemas = [f.physical_schema for f in fragments]  # a corrupt file: ArrowInvalid
    try:
        schema = pa.unify_schemas([*schemas, keys], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ExportError(
            f"the captured files of model '{request.model}' disagree on a column's type "
            f"({exc}): export the versions apart (--version)"
        ) from None
    chosen = ds.dataset(
        [f.path for f in fragments],
        schema=schema,
        filesystem=filesystem,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=root,
    )
    if by_path is not None:
        where &= by_path
    table = chosen.to_table(filter=where)
    if table.num_rows == 0:
        raise ExportError(_no_rows(request))
    others = [n for n in table.column_names if n not in ("version", "date", "hour")]
    table = table.select(["version", *others])
    model = pa.array([request.model] * table.num_rows, pa.string())
    return table.add_column(0, "model", model)


def read_labels(filesystem: FileSystem, base: str, model: str) -> pa.Table:
    """Every label of the model (request_id, label, kind, value, timestamp)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    columns = list(LABEL_COLUMNS)
    schema = pa.schema(
        [("request_id", pa.string()), ("label", pa.string()), ("kind", pa.string()),
         ("value", pa.float64()), ("timestamp", pa.timestamp("us", tz="UTC"))]
    )  # fmt: skip
    root = f"{base}/labels/model={model}"
    if filesystem.get_file_info(root).type.name != "Directory":
        return schema.empty_table()
    keys = pa.schema([("date", pa.string())])
    partitioning = ds.HivePartitioning(keys, segment_encoding="none")
    found = ds.dataset(root, filesystem=filesystem, format="parquet", partitioning=partitioning)
    return found.to_table(columns=["request_id", *columns]).cast(schema)


def join_labels(rows: pa.Table, labels: pa.Table) -> pa.Table:
    """Each row with its request's latest label (by the label's timestamp; labels of one
    instant in the order of their kind and text), or nulls: a left join by request_id."""
    import pyarrow as pa

    labels = labels.sort_by(
        [("request_id", "ascending"), ("timestamp", "ascending"), ("kind", "ascending"),
         ("label", "ascending")]
    )  # fmt: skip
    latest = {rid: i for i, rid in enumerate(labels.column("request_id").to_pylist())}
    picks = pa.array([latest.get(r) for r in rows.column("request_id").to_pylist()], pa.int64())
    taken = labels.take(picks)
    for source, name in LABEL_COLUMNS.items():
        rows = rows.append_column(name, taken.column(source))
    return rows


# -- naming and writing --------------------------------------------------------------------


def canonical(rows: pa.Table) -> tuple[pa.Table, str]:
    """The rows in their canonical order, and the dataset's id."""
    import pyarrow as pa

    digests = [row_digest(row) for batch in rows.to_batches(4096) for row in batch.to_pylist()]
    keyed = rows.append_column("__digest", pa.array(digests, pa.binary()))
    keyed = keyed.sort_by([(k, "ascending") for k in (*SORT_KEYS, "__digest")])
    total = hashlib.sha256(json.dumps(canonical_schema(rows.schema)).encode())
    for digest in keyed.column("__digest").to_pylist():
        total.update(digest)
    return keyed.drop_columns(["__digest"]), total.hexdigest()


def row_digest(row: dict[str, Any]) -> bytes:
    text = json.dumps(row, sort_keys=True, separators=(",", ":"), default=_json_value)
    return hashlib.sha256(text.encode()).digest()


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    raise TypeError(f"no canonical form for {type(value).__name__}")


def schema_of(rows: pa.Table) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in rows.schema]


def canonical_schema(schema: pa.Schema) -> list[dict[str, Any]]:
    """The schema as the dataset_id hashes it: fields by name at every level, no
    metadata (a tensor field's shape and batched are per file, and which file's the
    unified schema keeps depends on the files' order and names)."""
    return sorted((_canonical_field(f) for f in schema), key=lambda f: f["name"])


def _canonical_field(field: pa.Field) -> dict[str, Any]:
    return {"name": field.name, "type": _canonical_type(field.type)}


def _canonical_type(type_: pa.DataType) -> Any:
    import pyarrow as pa

    if pa.types.is_struct(type_):
        children = [_canonical_field(type_.field(i)) for i in range(type_.num_fields)]
        return {"struct": sorted(children, key=lambda f: f["name"])}
    if pa.types.is_fixed_size_list(type_):
        return {"fixed_size_list": _canonical_type(type_.value_type), "size": type_.list_size}
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        kind = "list" if pa.types.is_list(type_) else "large_list"
        return {kind: _canonical_type(type_.value_type)}
    return str(type_)


def write(rows: pa.Table, manifest: dict[str, Any], out: str) -> tuple[str, str]:
    """PATH and PATH.manifest.json, each written under a hidden name and renamed: a
    reader finds the whole file or none, and the manifest only once the rows are there."""
    import pyarrow.parquet as pq

    try:
        filesystem, path = open_filesystem(out)
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        filesystem.create_dir(folder, recursive=True)
        data = f"{folder}/.{uuid.uuid4().hex}.parquet.tmp"
        with filesystem.open_output_stream(data) as stream:
            pq.write_table(rows, stream, compression="zstd")
        filesystem.move(data, path)
        text = json.dumps(manifest, indent=2) + "\n"
        notes = f"{folder}/.{uuid.uuid4().hex}.json.tmp"
        with filesystem.open_output_stream(notes) as stream:
            stream.write(text.encode())
        filesystem.move(notes, f"{path}.manifest.json")
    except (OSError, ValueError) as exc:  # ValueError: a URI no filesystem takes
        raise ExportError(f"cannot write '{out}': {exc}", "--out") from None
    return path, f"{path}.manifest.json"


def iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _no_rows(request: ExportRequest) -> str:
    which = [f"model '{request.model}'"]
    if request.versions:
        which.append(f"version {', '.join(request.versions)}")
    if request.since:
        which.append(f"since {iso(request.since)}")
    if request.until:
        which.append(f"until {iso(request.until)}")
    return f"no answered requests ({STATUS}) of {' '.join(which)} in {request.capture_dir}"


def _and(left: Any, right: Any) -> Any:
    return right if left is None else left & right


def version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)
