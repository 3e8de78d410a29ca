"""CaptureWriter: captured rows from a bounded buffer to Hive-partitioned Parquet files,
written by a thread of its own (DESIGN §12: a full buffer drops and counts, never waits).

    <capture-dir>/requests/model=<name>/version=<v>/date=<YYYY-MM-DD>/hour=<HH>/<uuid>.parquet
    <capture-dir>/labels/model=<name>/date=<YYYY-MM-DD>/<uuid>.parquet

Rows and labels share one buffer, its budget and the thread. Each file is written under
a hidden temporary name in its partition and then moved to its final name, so a reader
(DuckDB, pyarrow.dataset, Spark) never sees a partial file.
The directory is a local path or a filesystem URI (s3://bucket/prefix, gs://, memory://,
...): writer.open_filesystem.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..config import CaptureConfig, ModelSpec
from ..errors import ConfigError
from .rows import CapturedLabel, PendingRows, Row, labels_table, table

if TYPE_CHECKING:
    import pyarrow as pa
    from pyarrow.fs import FileSystem

log = logging.getLogger(__name__)

# A row as the loop puts it: (config, version, row, its bytes, whether it split), or
# put_kept's (config, version, (expand, kept), its bytes, None).
Queued = tuple[ModelSpec, str, Any, int, bool | None]

FLAG = "--capture-dir"
SALT_BYTES = 32
# Columns of few distinct values, worth a Parquet dictionary.
DICTIONARY_COLUMNS = ("arm", "transport", "status", "error", "client", "kind", "version")
TENSOR_COLUMNS = ("inputs", "outputs", "shapes")
ROW_GROUP_BYTES = 16 << 20  # a row group's size in memory (writer._row_group_rows)
CONVERT_S = 1.0  # how often buffered rows become Arrow tables (the writer's thread)
# How long Arrow's allocator (mimalloc) keeps pages freed before it gives them back to the
# system. At its default, the pages one flush's Parquet encoder freed went back within
# milliseconds, and the next flush faulted its buffers in afresh as zeroed 2 MiB pages:
# 18 % of the writer thread's CPU on image rows (perf, 2026-12-07). Kept 30 s, they are
# reused flush after flush while capture runs, and given back once it is idle. mimalloc
# reads this when pyarrow first allocates; a value set in the environment wins.
ARROW_PAGES_KEPT = ("MIMALLOC_PURGE_DELAY", "30000")  # ms


class CaptureCounts:
    """What the writer did, for the metrics (read at scrape time)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], int] = defaultdict(int)  # (model, version)
        self.dropped: dict[tuple[str, str, str], int] = defaultdict(int)  # + reason
        self.labels: dict[str, int] = defaultdict(int)  # model
        self.labels_dropped: dict[tuple[str, str], int] = defaultdict(int)  # model, reason
        self.bytes = 0
        self.files = 0


def open_filesystem(uri: str) -> tuple[FileSystem, str]:
    """(filesystem, base path) for a local directory, a URI of a filesystem pyarrow has
    (file, s3, gs, hdfs, abfs), or else of one fsspec has (memory, ...; gcsfs, adlfs and
    others where installed), through pyarrow's FSSpecHandler. ValueError naming the URI
    when neither has one for it."""
    import pyarrow as pa
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), os.path.abspath(uri)
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as exc:
        # Only a scheme pyarrow lacks goes to fsspec: a URI pyarrow refused for what it
        # says (s3:/// with no bucket, file://relative) keeps pyarrow's reason.
        if not str(exc).startswith(_NOT_PYARROWS):
            raise
        import fsspec

        from .fsspec_files import FsspecFiles

        try:
            other, path = fsspec.core.url_to_fs(uri)
        except Exception as fsspec_exc:  # unknown, its package missing, its own refusal
            raise ValueError(
                f"no filesystem for '{uri}': pyarrow: {exc}; fsspec: {fsspec_exc!r}"
            ) from None
        filesystem = fs.PyFileSystem(FsspecFiles(other))
    return filesystem, path.rstrip("/")


# pyarrow's refusals of a URI whose scheme it has no filesystem for (or fsspec's
# chained `a::b` form): those URIs are fsspec's to try.
_NOT_PYARROWS = ("Unrecognized filesystem type", "Cannot parse URI")


class CaptureWriter:
    def __init__(
        self,
        config: CaptureConfig,
        counts: CaptureCounts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.counts = counts or CaptureCounts()
        self._clock = clock
        os.environ.setdefault(*ARROW_PAGES_KEPT)  # before pyarrow loads (open_filesystem)
        try:
            self._fs, self._base = open_filesystem(config.uri)
        except (OSError, ValueError) as exc:  # an unknown scheme, a bucket's region unknown
            raise ConfigError(FLAG, config.uri, str(exc)) from None
        # What the loop put, rows and labels in order, for the thread to take: a deque,
        # whose append (the loop's) and popleft (the thread's) are safe without a lock,
        # so the loop's put is a comparison, an append and an addition (DESIGN §12).
        self._queue: deque[Queued | CapturedLabel] = deque()
        # The buffer's bytes are _put_bytes - _done_bytes: what the loop put (only the
        # loop adds to it) less what the thread wrote or gave up (only the thread adds).
        self._put_bytes = 0
        self._done_bytes = 0
        self._early = config.max_bytes // 2  # held past this, the thread writes now
        self._lock = threading.Lock()  # the counts, shared by the loop and the thread
        # The thread's own, under _writing: labels taken from the queue and not yet
        # written, rows already turned into Arrow tables (config, version, parts), and the
        # bytes of both, which count against the budget until they are written.
        self._labels: list[CapturedLabel] = []
        self._tables: list[tuple[ModelSpec, str, list[pa.Table]]] = []
        self._taken_bytes = 0
        self._writing = threading.Lock()  # a pass of the thread (or a flush from outside)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned_day: dt.date | None = None
        self.salt = b""

    # -- start-up (before serving) -------------------------------------------------------

    def open(self) -> None:
        """Create the directory, prove it writable (ConfigError naming --capture-dir), read
        or make the salt of `capture_hash`, start the thread."""
        try:
            self._fs.create_dir(self._base, recursive=True)
            probe = f"{self._base}/.convoy-probe-{uuid.uuid4().hex}"
            with self._fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self._fs.delete_file(probe)
            self.salt = self._read_salt()
        except (OSError, ValueError) as exc:
            raise ConfigError(FLAG, self.config.uri, f"cannot write there: {exc}") from None
        _warm_up()
        self._thread = threading.Thread(target=self._run, name="convoy-capture", daemon=True)
        self._thread.start()

    def _read_salt(self) -> bytes:
        """One salt per capture directory: hashes stay joinable across restarts and
        replicas. Written under a temporary name and moved, then read back: of replicas
        starting together, all keep the one that is there. ValueError for a salt that is
        not 32 bytes of hex (an empty one would make hashed personal data reversible)."""
        path = f"{self._base}/_salt"
        if self._fs.get_file_info(path).type.name != "File":
            temporary = f"{self._base}/.salt-{uuid.uuid4().hex}.tmp"
            with self._fs.open_output_stream(temporary) as out:
                out.write(secrets.token_bytes(SALT_BYTES).hex().encode())
            self._fs.move(temporary, path)
        with self._fs.open_input_stream(path) as source:
            salt = bytes.fromhex(source.read().decode().strip())
        if len(salt) != SALT_BYTES:
            raise ValueError(f"{path} holds {len(salt)} bytes of salt, not {SALT_BYTES}")
        return salt

    # -- the event loop's side -----------------------------------------------------------

    def put(
        self, spec: ModelSpec, version: str, row: Row, nbytes: int, split: bool = False
    ) -> bool:
        """Buffer a row of a model version (`nbytes`: what it holds in memory; `split`:
        its tensors began new arena chunks); False (dropped, counted) when the budget is
        full. From one thread only, the event loop's: per request, so no lock."""
        if self._put_bytes - self._done_bytes + nbytes > self.config.max_bytes:
            with self._lock:
                self.counts.dropped[(spec.name, version, "buffer_full")] += 1
            return False
        self._queue.append((spec, version, row, nbytes, split))
        self._put_bytes += nbytes
        self._wake_early()
        return True

    def put_kept(
        self,
        spec: ModelSpec,
        version: str,
        expand: Callable[[tuple[Any, ...]], Row],
        kept: tuple[Any, ...],
        nbytes: int,
    ) -> bool:
        """Buffer a row kept by reference (the recorder's `kept`, values no one changes),
        laid out as a Row by `expand` on the writer's thread; else as put."""
        if self._put_bytes - self._done_bytes + nbytes > self.config.max_bytes:
            with self._lock:
                self.counts.dropped[(spec.name, version, "buffer_full")] += 1
            return False
        self._queue.append((spec, version, (expand, kept), nbytes, None))
        self._put_bytes += nbytes
        self._wake_early()
        return True

    def put_label(
        self,
        model: str,
        request_id: str,
        label: int | float | str,
        timestamp_us: int,
        version: str = "",
    ) -> bool:
        """Buffer the true label of an earlier request (a class index, a regression value
        or a class label; rows.py says how each is written); False (dropped, counted)
        when the budget is full. From the event loop's thread, as put."""
        item = CapturedLabel.of(model, version, request_id, label, timestamp_us)
        if self._put_bytes - self._done_bytes + item.nbytes > self.config.max_bytes:
            with self._lock:
                self.counts.labels_dropped[(model, "buffer_full")] += 1
            return False
        self._queue.append(item)
        self._put_bytes += item.nbytes
        self._wake_early()
        return True

    def _wake_early(self) -> None:
        if self._put_bytes - self._done_bytes > self._early and not self._wake.is_set():
            self._wake.set()  # write early rather than drop later

    # -- the writer's thread ---------------------------------------------------------------

    def _run(self) -> None:
        """Every CONVERT_S, the rows buffered so far become Arrow tables; every
        --capture-flush-secs (or early, when half the budget is held) they are written.
        Converting as rows come keeps each hold of the GIL short: one conversion of ten
        seconds' rows held it long enough to cost tiny 7 % of its throughput (x0.93
        against x0.99 converting each second, 2026-12-07)."""
        written = time.monotonic()
        while not self._stop.is_set():
            early = self._wake.wait(min(CONVERT_S, self.config.flush_s))
            self._wake.clear()
            if early or time.monotonic() - written >= self.config.flush_s:
                self._pass(self.flush)
                self._pass(self._prune)
                written = time.monotonic()
            else:
                self._pass(self._convert)
        self._pass(self.flush)

    def _pass(self, step: Callable[[], None]) -> None:
        """A bug in one pass must not end the thread: every later row would be dropped."""
        try:
            step()
        except Exception:
            log.exception("capture: the writer's %s failed", step.__name__)

    def flush(self) -> None:
        """Write what is buffered now: one file per model, version and hour, and one of
        labels per model and day."""
        with self._writing:
            try:
                self._tabulate(self._take())
                tables, self._tables = self._tables, []
                labels, self._labels = self._labels, []
                self._write_all(tables, labels)
            finally:
                # Written or counted as dropped: the budget is free again.
                self._done_bytes += self._taken_bytes
                self._taken_bytes = 0

    def _convert(self) -> None:
        """The rows buffered so far as Arrow tables, written at the next flush."""
        with self._writing:
            self._tabulate(self._take())

    def _take(self) -> dict[tuple[int, str], PendingRows]:  # under _writing
        """What the loop has put so far: rows by config and version (rows.PendingRows),
        labels into _labels."""
        rows: dict[tuple[int, str], PendingRows] = {}
        queue, labels = self._queue, self._labels
        for _ in range(len(queue)):
            item = queue.popleft()
            if isinstance(item, CapturedLabel):
                labels.append(item)
                self._taken_bytes += item.nbytes
                continue
            spec, version, row, nbytes, split = item
            self._taken_bytes += nbytes
            if split is None:  # put_kept's: laid out here, off the loop
                try:
                    row = row[0](row[1])
                except Exception:  # a bug: this row is lost, counted
                    log.exception(
                        "capture: a row of %s version %s not laid out", spec.name, version
                    )
                    with self._lock:
                        self.counts.dropped[(spec.name, version, "write_error")] += 1
                    continue
            pending = rows.get((id(spec), version))
            if pending is None:
                pending = rows[(id(spec), version)] = PendingRows(spec, version)
            if split:
                pending.breaks.append(len(pending.rows))
            pending.rows.append(row)
        return rows

    def _tabulate(self, rows: dict[tuple[int, str], PendingRows]) -> None:  # under _writing
        for pending in rows.values():
            try:
                data = table(pending)
            except Exception:  # a bug in building the table: these rows are lost, counted
                log.exception(
                    "capture: rows of %s version %s not converted",
                    pending.spec.name,
                    pending.version,
                )
                with self._lock:
                    key = (pending.spec.name, pending.version, "write_error")
                    self.counts.dropped[key] += len(pending)
                continue
            for spec, version, parts in self._tables:
                if spec is pending.spec and version == pending.version:
                    parts.append(data)
                    break
            else:
                self._tables.append((pending.spec, pending.version, [data]))

    def _write_all(
        self, tables: list[tuple[ModelSpec, str, list[pa.Table]]], labels: list[CapturedLabel]
    ) -> None:
        # By the config too: a version reloaded with another config.pbtxt between two
        # flushes has rows of two schemas, each written with its own.
        import pyarrow as pa

        for spec, version, parts in tables:
            model, lost = spec.name, 0
            try:
                hours = _by_hour(pa.concat_tables(parts))
            except Exception:  # a bug: these rows are lost, counted
                log.exception("capture: rows of %s version %s not joined", model, version)
                hours, lost = [], sum(part.num_rows for part in parts)
            for hour, data in hours:
                folder = f"requests/model={model}/version={version}/{hour}"
                if self._write(folder, data):
                    self.counts.rows[(model, version)] += data.num_rows
                else:
                    lost += data.num_rows
            if lost:
                with self._lock:  # the loop counts its drops under the same lock
                    self.counts.dropped[(model, version, "write_error")] += lost
        by_day: dict[tuple[str, str], list[CapturedLabel]] = defaultdict(list)
        for item in labels:
            by_day[(item.model, f"{_utc(item.timestamp_us):%Y-%m-%d}")].append(item)
        for (model, day), items in by_day.items():
            if self._write(f"labels/model={model}/date={day}", labels_table(items)):
                self.counts.labels[model] += len(items)
            else:
                with self._lock:
                    self.counts.labels_dropped[(model, "write_error")] += len(items)

    def _write(self, folder: str, data: pa.Table) -> bool:
        """One Parquet file in <capture-dir>/<folder>, atomically; False when it failed
        (logged; the caller counts what it lost)."""
        import pyarrow.parquet as pq

        folder = f"{self._base}/{folder}"
        name = uuid.uuid4().hex
        temporary, final = f"{folder}/.{name}.parquet.tmp", f"{folder}/{name}.parquet"
        try:
            self._fs.create_dir(folder, recursive=True)
            with self._fs.open_output_stream(temporary) as out:
                # LZ4: 0.10 ms of CPU per 48 KiB image row against zstd's 0.41 (pyarrow,
                # this machine), on a thread beside the model's; every reader has it.
                # Dictionaries for the few-valued strings only: tried on tensor values they
                # cost 0.52 ms per image row against 0.10, and are dropped as too large.
                dictionary = [c for c in DICTIONARY_COLUMNS if c in data.column_names]
                # Min/max statistics where a reader filters (ids, times, statuses), not on
                # tensor values: 10 of 80 µs of CPU per image row, and no reader uses them.
                statistics = [c for c in data.column_names if c not in TENSOR_COLUMNS]
                pq.write_table(
                    data,
                    out,
                    compression=_codecs(data.schema),
                    use_dictionary=dictionary,
                    write_statistics=statistics,
                    row_group_size=_row_group_rows(data),
                )
            self._fs.move(temporary, final)
            size = self._fs.get_file_info(final).size or 0
        except Exception as exc:  # a full disk, a failing store: drop, count, go on serving
            log.error("capture: %s not written: %r", folder, exc)
            with contextlib.suppress(Exception):
                self._fs.delete_file(temporary)
            return False
        self.counts.bytes += size
        self.counts.files += 1
        return True

    def _prune(self) -> None:
        """--capture-retention-days: whole date partitions older than that go, once a day."""
        days = self.config.retention_days
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        if days <= 0 or self._pruned_day == today:
            return
        self._pruned_day = today
        from pyarrow.fs import FileSelector

        oldest = today - dt.timedelta(days=days)

        def folders(path: str) -> list[str]:
            """One level down, never the files below: a store may hold millions."""
            found = self._fs.get_file_info(FileSelector(path, allow_not_found=True))
            return [i.path for i in found if i.type.name == "Directory"]

        try:  # requests/model=/version=/date=, labels/model=/date=
            dated = [
                day
                for model in folders(f"{self._base}/requests")
                for version in folders(model)
                for day in folders(version)
            ] + [day for model in folders(f"{self._base}/labels") for day in folders(model)]
        except OSError as exc:
            log.warning("capture: retention could not list the partitions: %r", exc)
            return
        for path in dated:
            part = path.rsplit("/", 1)[-1]
            if not part.startswith("date="):
                continue
            with contextlib.suppress(ValueError, OSError):
                if dt.date.fromisoformat(part[5:]) < oldest:
                    self._fs.delete_dir(path)

    def close(self, timeout_s: float | None = None) -> None:
        """Flush what is buffered and stop the thread (SIGTERM: nothing answered is lost)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("capture: the writer did not finish within %s s", timeout_s)

    def snapshot(self) -> dict[str, Any]:
        return {"buffered_bytes": self._put_bytes - self._done_bytes, "files": self.counts.files}


def _warm_up() -> None:
    """Import and run what a flush uses once, at start-up: the first flush imported
    pyarrow.parquet and pyarrow.compute on the writer's thread, about 0.4 s holding the
    GIL, during which the event loop answered no one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = pa.table({"timestamp": pa.array([0], pa.timestamp("us", tz="UTC"))})
    data.column("timestamp").cast(pa.int64()).to_numpy()
    pq.write_table(data.take([0]), pa.BufferOutputStream(), compression="lz4")


def _codecs(schema: pa.Schema) -> dict[str, str] | str:
    """LZ4 for every column but floating-point tensor values, stored as they are: LZ4
    finds next to nothing to shorten in them (52.1 against 51.9 KiB per image row) and
    cost 7 of 90 µs per row."""
    try:
        return {
            path: "none" if field.name in TENSOR_COLUMNS and is_float else "lz4"
            for field in schema
            for path, is_float in _leaves(field.name, field.type)
        }
    except TypeError:  # a leaf this cannot name would be left uncompressed: LZ4 for all
        return "lz4"


def _leaves(path: str, kind: pa.DataType) -> Iterator[tuple[str, bool]]:
    """Each Parquet leaf column under `path` (the names pyarrow writes: a list's values
    are `<path>.list.element`), and whether it holds floating-point values."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        for child in kind:
            yield from _leaves(f"{path}.{child.name}", child.type)
    elif (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ):
        yield from _leaves(f"{path}.list.element", kind.value_type)
    elif pa.types.is_nested(kind):  # a map or union: not a type capture writes
        raise TypeError(f"capture: no Parquet leaf names for {kind} at {path}")
    else:
        yield path, pa.types.is_floating(kind)


def _row_group_rows(data: pa.Table) -> int:
    """Rows per row group for about ROW_GROUP_BYTES each: the encoder holds a whole row
    group's pages in memory, and ten seconds of image rows in one (about 150 MiB) cost
    10 % more CPU in fresh pages than groups of 16 MiB reused."""
    per_row: int = max(1, data.nbytes // max(1, data.num_rows))
    return max(1, ROW_GROUP_BYTES // per_row)


def _by_hour(data: pa.Table) -> list[tuple[str, pa.Table]]:
    """The rows' table split by the UTC hour of their timestamps, with the partition path
    `date=<YYYY-MM-DD>/hour=<HH>` of each part (formatted once per part, not per row)."""
    import numpy as np
    import pyarrow as pa

    micros = data.column("timestamp").cast(pa.int64()).to_numpy()
    hours = micros // 3_600_000_000
    first, last = int(hours.min()), int(hours.max())
    if first == last:
        return [(_hour_path(first), data)]
    return [(_hour_path(int(h)), data.take(np.flatnonzero(hours == h))) for h in np.unique(hours)]


def _hour_path(hour: int) -> str:
    stamp = _utc(hour * 3_600_000_000)
    return f"date={stamp:%Y-%m-%d}/hour={stamp:%H}"


def _utc(timestamp_us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp_us / 1e6, dt.UTC)
