"""A batch job's output: one file per finished part, its dead letters beside it, and the
manifest `_convoy_batch.json` that says which parts are done.

    <output>/part-00000.parquet         id column, --keep columns, one column per output
    <output>/_convoy_batch.json         input, model, version, parts done, rows, errors
    <dead-letter>/part-00000.jsonl      {"id": ..., "error": ...} per refused row

A part's files are written under hidden temporary names and moved into place, and only
then is the part added to the manifest (itself written aside and moved): after a crash
a part is either in the manifest with its files, or recomputed under the same names.
Readers (DuckDB, pyarrow.dataset, Spark) skip names starting with `_` or `.`.

An output column holds one model output per row, as capture does for a model without a
batch dimension: a fixed-size list of the row's values (flattened) when the dims are
fixed, else a list, with the tensor's dims in the field's metadata (`shape`). CSV has
no lists: there a tensor is its JSON text; JSONL writes it as a (nested) JSON list.
"""

from __future__ import annotations

import base64
import io
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..capture.writer import open_filesystem
from ..config import TensorSpec
from ..tensors import NUMPY_DTYPES, Array

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST = "_convoy_batch.json"
SUFFIX = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}


class OutputError(Exception):
    """The output cannot be used as asked; the message names the flag."""


@dataclass
class Manifest:
    input: str
    model: str
    version: str
    part_rows: int
    format: str
    id_column: str | None
    parts: dict[int, dict[str, int]] = field(default_factory=dict)  # index -> rows, errors
    complete: bool = False

    @property
    def rows(self) -> int:
        return sum(p["rows"] for p in self.parts.values())

    @property
    def errors(self) -> int:
        return sum(p["errors"] for p in self.parts.values())

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["parts"] = [{"index": i, **p} for i, p in sorted(self.parts.items())]
        document["parts_done"] = len(self.parts)
        document["rows"] = self.rows
        document["errors"] = self.errors
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Manifest:
        parts = {
            int(p["index"]): {"rows": int(p["rows"]), "errors": int(p["errors"])}
            for p in document["parts"]
        }
        return cls(
            input=document["input"],
            model=document["model"],
            version=document["version"],
            part_rows=int(document["part_rows"]),
            format=document["format"],
            id_column=document.get("id_column"),
            parts=parts,
            complete=bool(document.get("complete", False)),
        )

    def differs(self, other: Manifest) -> list[str]:
        """What a resumed job changed that would mix two jobs' rows in one output."""
        names = ("input", "model", "version", "part_rows", "format", "id_column")
        return [
            f"{n} {getattr(self, n)!r} (was {getattr(other, n)!r})"
            for n in names
            if getattr(self, n) != getattr(other, n)
        ]


class Sink:
    """The output directory and the dead-letter directory (blocking I/O: executor)."""

    def __init__(self, output: str, dead_letter: str | None, fmt: str) -> None:
        try:
            self._fs, self._base = open_filesystem(output)
            if dead_letter is None:
                self._dead_fs, self._dead = self._fs, f"{self._base}/_dead_letter"
            else:
                self._dead_fs, self._dead = open_filesystem(dead_letter)
        except (OSError, ValueError) as exc:
            raise OutputError(f"--output {output}: {exc}") from None
        self.output = output
        self.format = fmt

    def existing(self) -> Manifest | None:
        """The manifest there; OutputError where the output holds files but none."""
        from pyarrow import fs

        info = self._fs.get_file_info(self._base)
        if info.type == fs.FileType.NotFound:
            return None
        if info.type == fs.FileType.File:
            raise OutputError(f"--output {self.output} is a file: name a directory")
        path = f"{self._base}/{MANIFEST}"
        if self._fs.get_file_info(path).type != fs.FileType.File:
            held = self._fs.get_file_info(fs.FileSelector(self._base))
            if held:
                raise OutputError(
                    f"--output {self.output} holds files but no {MANIFEST}: not a batch output"
                )
            return None
        with self._fs.open_input_stream(path) as source:
            try:
                return Manifest.from_json(json.loads(source.read()))
            except (ValueError, KeyError, TypeError) as exc:
                raise OutputError(
                    f"--output {self.output}: {MANIFEST} is unreadable: {exc}"
                ) from None

    def prepare(self) -> None:
        """The directories made, and the output proven writable before any row is
        scored (a filesystem may make directories it cannot write in: http://)."""
        try:
            self._fs.create_dir(self._base, recursive=True)
            self._dead_fs.create_dir(self._dead, recursive=True)
            probe = f"{self._base}/.convoy-probe-{uuid.uuid4().hex}"
            with self._fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self._fs.delete_file(probe)
        except OSError as exc:
            raise OutputError(f"--output {self.output}: cannot write there: {exc}") from None

    def write_part(self, index: int, table: pa.Table, dead: Sequence[tuple[Any, str]]) -> None:
        """The part's dead letters, then its rows, each moved into place whole."""
        name = f"part-{index:05d}"
        if dead:
            self.write_dead_letters(name, dead)
        self._put(self._fs, self._base, name + SUFFIX[self.format], encode(table, self.format))

    def write_dead_letters(self, name: str, dead: Sequence[tuple[Any, str]]) -> None:
        """<dead-letter>/<name>.jsonl: one {"id", "error"} line per refused row."""
        lines = "".join(json.dumps({"id": _jsonable(i), "error": e}) + "\n" for i, e in dead)
        self._put(self._dead_fs, self._dead, f"{name}.jsonl", lines.encode())

    def write_manifest(self, manifest: Manifest) -> None:
        text = json.dumps(manifest.as_json(), indent=1).encode()
        self._put(self._fs, self._base, MANIFEST, text)

    @staticmethod
    def _put(filesystem: Any, base: str, name: str, data: bytes) -> None:
        temporary = f"{base}/.{name}.{uuid.uuid4().hex}.tmp"
        with filesystem.open_output_stream(temporary) as out:
            out.write(data)
        filesystem.move(temporary, f"{base}/{name}")


def encode(table: pa.Table, fmt: str) -> bytes:
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        return bytes(buffer.getvalue())
    if fmt == "csv":
        import pyarrow.csv as csv

        columns = {
            name: _as_json_text(column) if _nested(column.type) else column
            for name, column in zip(table.column_names, table.columns, strict=True)
        }
        buffer = pa.BufferOutputStream()
        csv.write_csv(pa.table(columns), buffer)
        return bytes(buffer.getvalue())
    out = io.StringIO()
    for row in table.to_pylist():
        out.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
    return out.getvalue().encode()


def _nested(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_nested(kind) or pa.types.is_binary(kind))


def _as_json_text(column: pa.ChunkedArray) -> pa.Array:
    import pyarrow as pa

    return pa.array(
        [None if v is None else json.dumps(_jsonable(v)) for v in column.to_pylist()], pa.string()
    )


def _jsonable(value: Any) -> Any:
    """JSON for a cell: bytes as UTF-8 text where they are, else base64."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def output_column(spec: TensorSpec, values: Array) -> tuple[pa.Field, pa.Array]:
    """One output of every row (batch dimension first) as a column, capture's encoding."""
    import pyarrow as pa

    rows = values.shape[0]
    if spec.datatype == "BYTES":
        kind: pa.DataType = pa.binary()
        flat = values.reshape(-1).tolist()
        leaves = pa.array([v if isinstance(v, bytes) else str(v).encode() for v in flat], kind)
    else:
        dtype = NUMPY_DTYPES.get(spec.datatype, values.dtype)
        if spec.datatype == "BF16":
            dtype = np.dtype(np.float32)  # answered as float32 (replay's from_response)
        kind = pa.from_numpy_dtype(dtype)
        leaves = pa.array(np.ascontiguousarray(values, dtype=dtype).reshape(-1), kind)
    item = values.shape[1:]
    metadata = {"shape": json.dumps(list(spec.dims)), "batched": "false"}
    if -1 not in spec.dims:
        array: pa.Array = pa.FixedSizeListArray.from_arrays(leaves, math.prod(item))
    else:
        step = math.prod(item)
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * step)
        array = pa.ListArray.from_arrays(offsets, leaves)
    return pa.field(spec.name, array.type, metadata=metadata), array
