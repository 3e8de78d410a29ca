"""A batch job's input: a Parquet file, directory or glob, a CSV or a JSONL file (or a
directory of them), local or behind a pyarrow filesystem URI (s3://...), read as a
stream of record batches cut into parts of a fixed number of rows: memory holds a part
or two, whatever the input's size, and part k is the same rows on every run (resume).
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..capture.writer import open_filesystem

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as ds
    from pyarrow.fs import FileSystem

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
}


class SourceError(Exception):
    """The input cannot be read; the message names --input."""


@dataclass(frozen=True)
class Part:
    index: int
    first_row: int  # the position of its first row in the whole input
    table: pa.Table


def open_source(uri: str) -> ds.Dataset:
    """The input as a dataset, its files in a stable (sorted) order."""
    import pyarrow.dataset as ds

    try:
        filesystem, path = open_filesystem(uri)
    except (OSError, ValueError) as exc:
        raise SourceError(f"--input {uri}: {exc}") from None
    files = _files(filesystem, path, uri)
    kinds = {FORMATS.get(posixpath.splitext(f)[1].lower()) for f in files}
    kinds.discard(None)
    if len(kinds) > 1:
        raise SourceError(
            f"--input {uri}: mixes formats ({', '.join(sorted(k for k in kinds if k))})"
        )
    kind = kinds.pop() if kinds else "parquet"
    try:
        return ds.dataset(sorted(files), filesystem=filesystem, format=kind)
    except (OSError, ValueError, TypeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise SourceError(f"--input {uri}: cannot read it as {kind}: {exc}") from None


def _files(filesystem: FileSystem, path: str, uri: str) -> list[str]:
    from pyarrow import fs

    if any(c in path for c in "*?["):
        base = path
        while any(c in base for c in "*?["):
            base = posixpath.dirname(base)
        found = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
        files = [i.path for i in found if i.type == fs.FileType.File]
        files = [f for f in files if fnmatch.fnmatch(f, path)]
        if not files:
            raise SourceError(f"--input {uri}: no file matches")
        return files
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise SourceError(f"--input {uri}: no such file or directory")
    if info.type == fs.FileType.File:
        return [path]
    found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    files = [
        i.path
        for i in found
        if i.type == fs.FileType.File
        and not any(p.startswith(("_", ".")) for p in posixpath.relpath(i.path, path).split("/"))
    ]
    if not files:
        raise SourceError(f"--input {uri}: the directory holds no file")
    return files


def parts(
    dataset: ds.Dataset, columns: Sequence[str], part_rows: int, skip: frozenset[int] = frozenset()
) -> Iterator[Part]:
    """The input's rows in order, part_rows at a time (the last part may be shorter).
    Parts in `skip` are read past, not built."""
    import pyarrow as pa

    pending: list[pa.RecordBatch] = []
    held = 0
    index = 0
    first_row = 0
    for batch in _batches(dataset, columns, min(part_rows, 65_536)):
        while batch.num_rows:
            take = min(part_rows - held, batch.num_rows)
            if index not in skip:
                pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == part_rows:
                if index not in skip:
                    yield Part(index, first_row, pa.Table.from_batches(pending))
                pending, held, first_row, index = [], 0, first_row + part_rows, index + 1
    if held and index not in skip:
        yield Part(index, first_row, pa.Table.from_batches(pending))


def _batches(dataset: ds.Dataset, columns: Sequence[str], size: int) -> Iterator[pa.RecordBatch]:
    """The dataset's record batches in order, read with little ahead: the scanner's
    read-ahead holds several row groups (hundreds of MiB of wide rows such as images),
    where a Parquet file read row group by row group holds about one."""
    import pyarrow.parquet as pq

    if dataset.format.default_extname != "parquet":
        yield from dataset.to_batches(
            columns=list(columns), batch_size=size, batch_readahead=1, fragment_readahead=1
        )
        return
    for path in dataset.files:
        with dataset.filesystem.open_input_file(path) as source:
            reader = pq.ParquetFile(source, pre_buffer=False)
            yield from reader.iter_batches(batch_size=size, columns=list(columns))
