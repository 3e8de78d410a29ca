"""Capture without a server: the config parameters, sampling, the Parquet layout as DuckDB
reads it, the writer's budget, failures, atomic files and retention."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convoy.capture.arena import Arena, joined
from convoy.capture.recorder import CaptureRecorder, sampled
from convoy.capture.rows import Row
from convoy.capture.writer import CaptureWriter
from convoy.config import CaptureConfig, CaptureSpec, read_model_config, validate_model_config
from convoy.errors import ConfigError, InvalidInput

duckdb = pytest.importorskip("duckdb", reason="duckdb missing: a test extra")
pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")

CONFIG = """
name: "m"
backend: "convoy_python"
max_batch_size: 8
input [
  {{ name: "X" data_type: TYPE_FP32 dims: [ 2 ] }},
  {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "VAR" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "EMAIL" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 2 ] }} ]
parameters [ {params} ]
"""


def spec_of(tmp_path: Path, **params: str) -> Any:
    text = ", ".join(f'{{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "config.pbtxt").write_text(CONFIG.format(params=text))
    return validate_model_config(read_model_config(folder), "m/config.pbtxt", "m")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"capture_sample_rate": "1.5"}, "parameters.capture_sample_rate"),
        ({"capture_sample_rate": "often"}, "parameters.capture_sample_rate"),
        ({"capture_sample_rate": "0.5", "capture_by": "user"}, "parameters.capture_by"),
        ({"capture_sample_rate": "0.5", "capture_outputs": "maybe"}, "parameters.capture_outputs"),
        ({"capture_sample_rate": "1", "capture_exclude": "NOPE"}, "parameters.capture_exclude"),
        ({"capture_sample_rate": "1", "capture_hash": "X, NOPE"}, "parameters.capture_hash"),
    ],
)
def test_a_bad_capture_parameter_is_a_config_error_naming_it(
    tmp_path: Path, params: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_of(tmp_path, **params)
    assert raised.value.field == field


def test_capture_parameters_are_read(tmp_path: Path) -> None:
    assert spec_of(tmp_path, drift_seed="1").capture is None  # no sample rate: off
    assert spec_of(tmp_path, capture_sample_rate="0").capture is None
    spec = spec_of(
        tmp_path, capture_sample_rate="0.25", capture_by="ab_key", capture_outputs="false",
        capture_exclude="EMAIL", capture_hash="TEXT",
    )  # fmt: skip
    assert spec.capture == CaptureSpec(
        0.25, "ab_key", False, frozenset({"EMAIL"}), frozenset({"TEXT"})
    )


class _Answer:
    """The part of an Answered that sampling reads."""

    def __init__(self, request_id: str, key: str | None = None) -> None:
        self.request_id = request_id
        self.ab_key = lambda: key


def test_sampling_by_key_is_always_in_or_always_out() -> None:
    spec = CaptureSpec(0.3, "request_id")
    never: Any = lambda: pytest.fail("a keyed sample must not draw")  # noqa: E731
    first = [sampled(spec, _Answer(f"id-{i}"), never) for i in range(2000)]  # type: ignore[arg-type]
    again = [sampled(spec, _Answer(f"id-{i}"), never) for i in range(2000)]  # type: ignore[arg-type]
    assert first == again
    assert 0.25 < sum(first) / len(first) < 0.35
    by_key = CaptureSpec(0.5, "ab_key")
    keyed = {sampled(by_key, _Answer(f"r{i}", "user-7"), never) for i in range(50)}  # type: ignore[arg-type]
    assert len(keyed) == 1  # one A/B key: every request in, or every one out


def row(spec: Any, i: int, **overrides: Any) -> tuple[Any, str, Row, int]:
    """writer.put's arguments for a row of `spec`'s version 1: 1000 bytes."""
    rows = 1 + i % 3
    fields: dict[str, Any] = dict(
        request_id=f"r{i}",
        timestamp_us=int(dt.datetime(2026, 12, 7, 5, 30, tzinfo=dt.UTC).timestamp() * 1e6) + i,
        arm="none", transport="grpc", status="OK", error=None, queue_us=10, compute_us=20,
        total_us=35, cache_hit=False, client="anonymous",
        inputs={
            "X": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + i,
            "TEXT": np.array([[f"t{i}-{r}".encode()] for r in range(rows)], dtype=object),
            "VAR": np.arange(rows * (i + 1), dtype=np.int64).reshape(rows, i + 1),
            "EMAIL": np.array([[b"a@b.c"]] * rows, dtype=object),
        },
        outputs={"Y": np.full((rows, 2), 2.0 * i, np.float32)},
    )  # fmt: skip
    version = overrides.pop("version", "1")
    fields.update(overrides)
    return spec, version, row_of(spec, **fields), 1000


def row_of(
    spec: Any,
    request_id: str,
    timestamp_us: int,
    arm: str,
    transport: str,
    status: str,
    error: str | None,
    queue_us: int | None,
    compute_us: int | None,
    total_us: int | None,
    cache_hit: bool,
    client: str | None,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
) -> Row:
    """A row as the recorder lays it out (rows.Row): SCALARS, inputs, outputs."""
    return (
        request_id, timestamp_us, arm, transport, status, error, queue_us, compute_us,
        total_us, cache_hit, client,
        *[inputs.get(t.name) for t in spec.captured_inputs],
        *[outputs.get(t.name) for t in spec.outputs],
    )  # fmt: skip


def writer_at(tmp_path: Path, **settings: Any) -> CaptureWriter:
    config = CaptureConfig(uri=str(tmp_path / "capture"), **settings)
    writer = CaptureWriter(config)
    writer.open()
    return writer


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "_salt")


def test_rows_read_back_with_duckdb_as_written(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1", capture_exclude="EMAIL")
    writer = writer_at(tmp_path, flush_s=60)
    refused = row(spec, 9, status="INVALID_ARGUMENT", error="bad X", inputs={}, outputs={},
                  queue_us=None, compute_us=None)  # fmt: skip
    for r in [row(spec, i) for i in range(4)] + [refused]:
        assert writer.put(*r)
    writer.close(30)
    (written,) = files(tmp_path / "capture")
    assert written.relative_to(tmp_path / "capture").parts[:5] == (
        "requests", "model=m", "version=1", "date=2026-12-07", "hour=05",
    )  # fmt: skip
    glob = str(tmp_path / "capture" / "requests" / "**" / "*.parquet")
    db = duckdb.connect()
    got = db.execute(
        f"SELECT request_id, model, version, status, error, queue_us, inputs.X, inputs.VAR, "
        f"inputs.TEXT, outputs.Y, shapes.VAR, date, hour "
        f"FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY request_id"
    ).fetchall()
    assert [g[0] for g in got] == ["r0", "r1", "r2", "r3", "r9"]
    r1 = got[1]
    assert r1[1:6] == ("m", 1, "OK", None, 10)  # model and version: the partition keys
    assert r1[6] == [[1.0, 2.0], [3.0, 4.0]]  # 2 batch rows of the fixed [2] dims
    assert r1[7] == [[0, 1], [2, 3]] and r1[10] == [2, 2]  # variable dims, shape kept
    assert r1[8] == [[b"t1-0"], [b"t1-1"]] and r1[9] == [[2.0, 2.0], [2.0, 2.0]]
    assert str(r1[11]) == "2026-12-07" and int(r1[12]) == 5
    assert got[4][3:5] == ("INVALID_ARGUMENT", "bad X") and got[4][6] is None
    columns = {c[0] for c in db.execute(f"DESCRIBE SELECT inputs FROM '{glob}'").fetchall()}
    assert columns == {"inputs"}
    fields = db.execute(f"SELECT inputs FROM '{glob}' LIMIT 1").fetchone()[0]  # type: ignore[index]
    assert "EMAIL" not in fields  # capture_exclude: never written


def test_field_metadata_carries_the_triton_shape(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path)
    writer.put(*row(spec, 0))
    writer.close(30)
    (written,) = files(tmp_path / "capture")
    inputs = pq.read_schema(written).field("inputs").type
    x = inputs.field("X")
    assert json.loads(x.metadata[b"shape"]) == [2] and json.loads(x.metadata[b"batched"])
    assert x.type.value_type.list_size == 2  # fixed dims: fixed-size lists
    assert json.loads(inputs.field("VAR").metadata[b"shape"]) == [-1]


def test_hashed_inputs_are_salted_sha256_stable_across_restarts(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1", capture_hash="EMAIL")
    statuses: list[str] = []
    digests = []
    for _ in range(2):  # two server lifetimes over one directory
        writer = writer_at(tmp_path)
        recorder = CaptureRecorder(writer, lambda e: statuses.append(e.message) or "X")
        answered = fake_answered(spec, {"EMAIL": np.array([[b"ann@example.com"]], dtype=object)})
        recorder(answered)
        writer.close(30)
        digests.append(writer.salt)
    assert digests[0] == digests[1] and len(digests[0]) == 32
    glob = str(tmp_path / "capture" / "requests" / "**" / "*.parquet")
    values = duckdb.connect().execute(f"SELECT inputs.EMAIL FROM '{glob}'").fetchall()
    assert len(values) == 2 and values[0] == values[1]
    (digest,) = values[0][0][0]
    assert len(digest) == 64 and "ann" not in digest


def fake_answered(spec: Any, inputs: dict[str, Any], error: Exception | None = None) -> Any:
    from convoy.batching.request import InferRequest, InferResult
    from convoy.inference.path import Answered

    served = type("Served", (), {"spec": spec, "version_label": "1"})()
    request = InferRequest("", inputs, ("Y",), 1, (), None, arrival_ns=1_000, dispatch_ns=5_000)  # type: ignore[arg-type]
    result = None if error else InferResult({"Y": np.zeros((1, 2), np.float32)})
    return Answered("http", "anonymous", "", served, "none", request, result, error, False, 9_000,
                    lambda: None)  # type: ignore[arg-type]  # fmt: skip


def test_a_refused_request_is_captured_with_its_status(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path)
    recorder = CaptureRecorder(writer, lambda e: "INVALID_ARGUMENT")
    recorder(fake_answered(spec, {}, InvalidInput("input 'X' has the wrong shape")))
    writer.close(30)
    glob = str(tmp_path / "capture" / "requests" / "**" / "*.parquet")
    got = (
        duckdb.connect()
        .execute(
            f"SELECT status, error, transport, queue_us, total_us, outputs.Y, length(request_id) "
            f"FROM '{glob}'"
        )
        .fetchall()
    )
    assert got == [("INVALID_ARGUMENT", "input 'X' has the wrong shape", "http", 4, 8, None, 32)]


def test_a_full_budget_drops_and_counts_never_waits(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=60, max_bytes=2500)
    stalled, flush = threading.Event(), writer.flush
    writer.flush = lambda: (stalled.wait(30), flush())[1]  # type: ignore[method-assign]
    outcomes = [writer.put(*row(spec, i)) for i in range(4)]  # 1000 bytes each
    assert outcomes == [True, True, False, False]  # a stalled store costs rows, not time
    assert writer.counts.dropped == {("m", "1", "buffer_full"): 2}
    stalled.set()
    writer.close(30)
    assert writer.counts.rows == {("m", "1"): 2} and writer.counts.files == 1


def test_a_failing_write_drops_counts_and_leaves_no_partial_file(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=60)
    blocked = tmp_path / "capture" / "requests"
    blocked.write_text("a file where the requests folder goes: every write fails")
    writer.put(*row(spec, 0))
    writer.flush()
    assert writer.counts.dropped == {("m", "1", "write_error"): 1}
    blocked.unlink()
    writer.put(*row(spec, 1))  # the store is back: writing goes on
    writer.close(30)
    assert writer.counts.rows == {("m", "1"): 1}
    assert [p.suffix for p in files(tmp_path / "capture")] == [".parquet"]


def test_an_unwritable_capture_dir_is_refused_naming_the_flag(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")
    writer = CaptureWriter(CaptureConfig(uri=str(tmp_path / "taken" / "capture")))
    with pytest.raises(ConfigError, match="--capture-dir"):
        writer.open()


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("nosuch://bucket/capture", "fsspec: ValueError('Protocol not known: nosuch')"),
        ("s3:///capture", "Missing bucket name"),  # pyarrow's own reason, fsspec not asked
        ("http://127.0.0.1:9/capture", "cannot write there: http: a read-only filesystem"),
    ],
)
def test_a_uri_no_filesystem_writes_is_refused_naming_the_flag(uri: str, says: str) -> None:
    with pytest.raises(ConfigError, match="--capture-dir") as raised:
        CaptureWriter(CaptureConfig(uri=uri)).open()
    assert raised.value.path == "--capture-dir" and raised.value.field == uri
    assert says in raised.value.problem and ("fsspec" in says) == ("fsspec" in raised.value.problem)


def test_a_uri_only_fsspec_knows_is_written_through_it(tmp_path: Path) -> None:
    """memory:// is fsspec's alone (pyarrow has no such filesystem): rows land there as
    complete Parquet files under the same Hive layout, read back through fsspec."""
    import fsspec
    import pyarrow.parquet as pq

    spec = spec_of(tmp_path, capture_sample_rate="1")
    memory = fsspec.filesystem("memory")
    writer = CaptureWriter(CaptureConfig(uri="memory://convoy-test/capture", flush_s=60))
    try:
        writer.open()
        for i in range(3):
            writer.put(*row(spec, i))
        writer.close(30)
        found = memory.find("/convoy-test/capture/requests")
        assert [p.rsplit("/", 2)[0] for p in found] == [
            "/convoy-test/capture/requests/model=m/version=1/date=2026-12-07"
        ]
        assert found[0].endswith(".parquet") and "/hour=05/" in found[0]
        with memory.open(found[0], "rb") as stream:
            data = pq.read_table(stream)
        assert sorted(data.column("request_id").to_pylist()) == ["r0", "r1", "r2"]
        assert writer.counts.rows == {("m", "1"): 3} and writer.counts.files == 1
    finally:
        if memory.exists("/convoy-test"):
            memory.rm("/convoy-test", recursive=True)


def test_random_sampling_draws_once_per_request_at_the_rate() -> None:
    rng = np.random.default_rng(7)
    draws = []

    def draw() -> float:
        draws.append(rng.random())
        return draws[-1]

    spec = CaptureSpec(0.25, "random")
    taken = [sampled(spec, _Answer(f"r{i}"), draw) for i in range(4000)]  # type: ignore[arg-type]
    assert len(draws) == 4000 and taken == [d < 0.25 for d in draws]
    assert 0.22 < sum(taken) / len(taken) < 0.28
    # Keyed, but sent without the key: drawn at random rather than all in or all out.
    keyed = CaptureSpec(0.25, "request_id")
    unkeyed = [sampled(keyed, _Answer(""), draw) for _ in range(4000)]  # type: ignore[arg-type]
    assert 0.22 < sum(unkeyed) / len(unkeyed) < 0.28
    assert all(sampled(CaptureSpec(1.0, "random"), _Answer("x"), never_drawn) for _ in range(9))  # type: ignore[arg-type]


def never_drawn() -> float:
    raise AssertionError("a rate of 1 takes every request without a draw")


# A writer killed (SIGKILL) half-way through a file: the encoder's first half is out,
# the rest never comes. Labels, the smallest rows a writer takes.
_KILLED_MID_WRITE = """
import os, signal, sys
import pyarrow as pa
import pyarrow.parquet as pq
from convoy.capture.writer import CaptureWriter
from convoy.config import CaptureConfig

whole = pq.write_table

def half_then_killed(data, out, **options):
    encoded = pa.BufferOutputStream()
    whole(data, encoded, **options)
    data = encoded.getvalue().to_pybytes()
    out.write(data[: len(data) // 2])
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)

writer = CaptureWriter(CaptureConfig(uri=sys.argv[1], flush_s=3600))
writer.open()
pq.write_table = half_then_killed
writer.put_label("m", "r1", 3, 1_765_000_000_000_000, "1")
writer.flush()
"""


def test_a_writer_killed_mid_file_leaves_no_visible_partial_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    capture = tmp_path / "capture"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WRITE, str(capture)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    (partial,) = [p for p in capture.rglob("*") if p.is_file() and p.name != "_salt"]
    assert partial.name.startswith(".") and partial.name.endswith(".parquet.tmp")
    assert partial.stat().st_size > 0  # killed mid-write, as meant
    assert list(capture.rglob("*.parquet")) == []  # a reader's glob finds nothing partial


def test_retention_removes_old_date_partitions(tmp_path: Path) -> None:
    now = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC).timestamp()
    config = CaptureConfig(uri=str(tmp_path / "capture"), retention_days=2)
    writer = CaptureWriter(config, clock=lambda: now)
    writer.open()
    base = tmp_path / "capture" / "requests" / "model=m" / "version=1"
    for day in ("2026-12-01", "2026-12-04", "2026-12-05", "2026-12-07"):
        (base / f"date={day}" / "hour=00").mkdir(parents=True)
    writer._prune()
    writer.close(30)
    assert sorted(os.listdir(base)) == ["date=2026-12-05", "date=2026-12-07"]


@pytest.mark.parametrize("salt", ["", "not hex", "ab" * 8])
def test_a_damaged_salt_is_refused_naming_the_flag(tmp_path: Path, salt: str) -> None:
    """An empty salt would make capture_hash a plain SHA-256 (reversible for an email)."""
    (tmp_path / "capture").mkdir()
    (tmp_path / "capture" / "_salt").write_text(salt)
    with pytest.raises(ConfigError, match="--capture-dir"):
        writer_at(tmp_path)


def test_rows_of_two_configs_of_one_version_go_to_files_of_their_own(tmp_path: Path) -> None:
    """A version reloaded with another config.pbtxt between flushes: each row is written
    with its own schema, none re-chunked into the other's dims."""
    old = spec_of(tmp_path, capture_sample_rate="1")
    (tmp_path / "m" / "config.pbtxt").write_text(
        (tmp_path / "m" / "config.pbtxt").read_text().replace("dims: [ 2 ]", "dims: [ 4 ]")
    )
    new = validate_model_config(read_model_config(tmp_path / "m"), "m/config.pbtxt", "m")
    writer = writer_at(tmp_path, flush_s=60)
    writer.put(*row(old, 0))
    four = row(new, 1, inputs={"X": np.arange(8, dtype=np.float32).reshape(2, 4)}, outputs={})
    writer.put(*four)
    writer.close(30)
    assert len(files(tmp_path / "capture")) == 2
    got = {}
    for path in files(tmp_path / "capture"):
        (r,) = duckdb.connect().execute(f"SELECT request_id, inputs.X FROM '{path}'").fetchall()
        got[r[0]] = r[1]
    assert got == {"r0": [[0.0, 1.0]], "r1": [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]}


def test_rows_being_written_still_count_against_the_budget(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=60, max_bytes=2500)
    writing, release, write_all = threading.Event(), threading.Event(), writer._write_all

    def slow_store(*args: Any) -> None:
        writing.set()
        release.wait(30)
        write_all(*args)

    writer._write_all = slow_store  # type: ignore[method-assign]
    assert writer.put(*row(spec, 0)) and writer.put(*row(spec, 1))  # 2000 bytes: wakes it
    assert writing.wait(30)
    assert not writer.put(*row(spec, 2))  # the 2000 bytes in the store's hands still count
    release.set()
    writer.close(30)
    assert writer.counts.rows == {("m", "1"): 2}


def test_a_failing_pass_does_not_end_the_writer(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=0.05, retention_days=1)
    failures = []

    def broken() -> None:
        failures.append(1)
        raise ValueError("a bug in retention")

    writer._prune = broken  # type: ignore[method-assign]
    deadline = time.monotonic() + 10
    while len(failures) < 2:  # failed at least twice: the thread went on
        assert time.monotonic() < deadline
        time.sleep(0.02)
    writer.put(*row(spec, 0))
    writer.close(30)
    assert writer.counts.rows == {("m", "1"): 1}


def test_rows_of_one_flush_across_an_hour_go_to_each_hours_partition(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=60)
    hour = 3_600_000_000
    five = int(dt.datetime(2026, 12, 7, 5, 0, tzinfo=dt.UTC).timestamp() * 1e6)
    for i, stamp in enumerate([five + hour - 1, five + hour, five + 2, five + 2 * hour + 7]):
        writer.put(*row(spec, i, timestamp_us=stamp))
    writer.close(30)
    by_hour: dict[str, list[str]] = {}
    for path in files(tmp_path / "capture"):
        found = duckdb.connect().execute(f"SELECT request_id FROM '{path}'").fetchall()
        by_hour[path.parent.name] = sorted(r for (r,) in found)
    assert by_hour == {"hour=05": ["r0", "r2"], "hour=06": ["r1"], "hour=07": ["r3"]}
    assert writer.counts.rows == {("m", "1"): 4}


def test_a_value_is_copied_into_its_arena_whatever_memory_held_it() -> None:
    image = np.arange(4096, dtype=np.float32)
    ring = bytearray(image.tobytes())  # a front end's ring, a client's shared memory
    shared = np.frombuffer(memoryview(ring), np.float32).reshape(1, 4096)
    arena = Arena(np.dtype(np.float32), chunk_bytes=3 * 4096 * 4)
    kept = arena.copy(shared)
    ring[:4] = b"\xff\xff\xff\xff"
    assert kept is not shared and kept[0, 0] == 0.0 and kept.shape == (1, 4096)
    assert isinstance(kept.base, np.ndarray) and kept.base.dtype == np.uint8  # the chunk
    larger = np.zeros(4 * 4096, np.float32)
    assert arena.copy(larger).base is None  # larger than a chunk: a copy of its own
    small = np.frombuffer(b"\x00" * 64, np.float32)
    assert arena.copy(small).base is None  # a copy of its own: cheaper than slicing
    strided = np.arange(2 * 4096, dtype=np.float32).reshape(4096, 2).T  # not C-contiguous
    copied = arena.copy(strided)
    assert copied.base is kept.base and copied.flags.c_contiguous  # the same chunk
    assert copied.shape == (2, 4096) and np.array_equal(copied, strided)


def test_an_arena_reuses_a_chunk_only_once_nothing_points_into_it() -> None:
    arena = Arena(np.dtype(np.float32), chunk_bytes=2 * 16, small_bytes=0)  # 2 x 4 floats
    values = [np.full(4, i, np.float32) for i in range(6)]
    kept = [arena.copy(v) for v in values[:2]]
    first_chunk = id(kept[0].base)  # not the chunk itself: a reference would hold it
    assert arena.rolled and id(kept[1].base) == first_chunk
    arena.rolled = False
    third = arena.copy(values[2])  # the first chunk is full and still read: a new one
    assert arena.rolled and id(third.base) != first_chunk
    assert [int(k[0]) for k in kept] == [0, 1]
    del kept
    arena.copy(values[3])
    fifth = arena.copy(values[4])  # the first chunk, free again, is reused
    assert id(fifth.base) == first_chunk and int(fifth[0]) == 4
    assert int(third[0]) == 2  # the second, still read, was not


def test_values_end_to_end_in_a_chunk_are_joined_without_a_copy() -> None:
    arena = Arena(np.dtype(np.float32), chunk_bytes=1 << 16)
    kept = [arena.copy(np.full((1, 1024), i, np.float32)) for i in range(3)]
    together = joined(kept)
    assert together is not None and np.shares_memory(together, kept[0])
    assert together.tolist() == [0.0] * 1024 + [1.0] * 1024 + [2.0] * 1024
    other = arena.copy(np.full((1, 1024), 9, np.float32))  # another version's row between
    assert joined([kept[0], kept[1], other]) is None  # not end to end: joined by a copy
    assert joined([np.zeros(4, np.float32)]) is None  # not an arena's


def test_requests_sent_without_an_id_get_distinct_ids(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=60)
    for i in range(5):
        writer.put(*row(spec, i, request_id="" if i != 2 else "sent"))
    writer.flush()
    writer.put(*row(spec, 5, request_id=""))
    writer.close(30)
    query = "SELECT request_id FROM '{}'"
    ids = [r for path in files(tmp_path / "capture")
           for (r,) in duckdb.connect().execute(query.format(path)).fetchall()]  # fmt: skip
    assert len(ids) == 6 and len(set(ids)) == 6 and "sent" in ids
    made = [r for r in ids if r != "sent"]
    assert all(len(r) == 32 and int(r, 16) >= 0 for r in made)  # as uuid4().hex is written


def test_rows_converted_between_flushes_are_written_in_the_flushs_file(tmp_path: Path) -> None:
    """The writer's thread turns rows into tables every second and writes every
    --capture-flush-secs: one file per flush, and the bytes held until it is written."""
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = CaptureWriter(CaptureConfig(uri=str(tmp_path / "capture"), flush_s=60))
    writer.open()  # its thread converts each second, writes at 60 s or close
    for i in range(3):
        writer.put(*row(spec, i))
    writer._convert()
    assert writer.counts.rows == {} and writer.snapshot()["buffered_bytes"] == 3000
    writer.put(*row(spec, 3))
    writer.close(30)
    (written,) = files(tmp_path / "capture")
    found = duckdb.connect().execute(f"SELECT request_id FROM '{written}' ORDER BY 1").fetchall()
    assert [r for (r,) in found] == ["r0", "r1", "r2", "r3"]
    assert writer.counts.rows == {("m", "1"): 4} and writer.snapshot()["buffered_bytes"] == 0


def test_float_tensor_values_uncompressed_and_row_groups_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    from convoy.capture import writer as writer_module

    monkeypatch.setattr(writer_module, "ROW_GROUP_BYTES", 4096)  # a few rows a group
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = writer_at(tmp_path, flush_s=60)
    for i in range(40):
        assert writer.put(*row(spec, i))
    writer.flush()
    (path,) = files(tmp_path / "capture")
    metadata = pq.ParquetFile(path).metadata
    codecs = {
        metadata.row_group(0).column(c).path_in_schema: metadata.row_group(0).column(c).compression
        for c in range(metadata.num_columns)
    }
    assert codecs["inputs.X.list.element.list.element"] == "UNCOMPRESSED"
    assert codecs["outputs.Y.list.element.list.element"] == "UNCOMPRESSED"
    assert codecs["inputs.VAR.list.element.list.element"] == "LZ4"  # integers: LZ4
    assert codecs["inputs.TEXT.list.element.list.element"] == "LZ4"
    assert codecs["request_id"] == codecs["shapes.X.list.element"] == "LZ4"
    # Every column is named (pyarrow leaves one missing from the dict uncompressed).
    assert set(writer_module._codecs(pq.ParquetFile(path).schema_arrow)) == set(codecs)
    float_values = {p for p in codecs if p.split(".")[0] in ("inputs", "outputs")} - {
        "inputs.VAR.list.element.list.element",
        "inputs.TEXT.list.element.list.element",
    }
    assert {c for p, c in codecs.items() if p not in float_values} == {"LZ4"}
    assert metadata.num_row_groups > 1 and metadata.num_rows == 40
    table = duckdb.sql(f"SELECT request_id FROM read_parquet('{path}') ORDER BY 1").fetchall()
    assert sorted(r for (r,) in table) == sorted(f"r{i}" for i in range(40))
    writer.close()


# A fresh interpreter: Arrow's allocator reads its settings once, when pyarrow first
# allocates. Prints the minor page faults per row of each flush after the first two
# (the second may still grow the allocator's pages, as now and then a later one does).
_FLUSHES = """
import resource, sys, time
from convoy.capture.recorder import CaptureRecorder
from convoy.capture.writer import CaptureWriter
from convoy.config import CaptureConfig
from loadtests.capture_cost import answered

writer = CaptureWriter(CaptureConfig(uri=sys.argv[1], flush_s=3600, max_bytes=1 << 30))
writer.salt = bytes(32)
record = CaptureRecorder(writer, status_of=lambda error: "INTERNAL")
items = answered("image_classifier", 300)
for flush in range(7):
    for item in items:
        record(item)
    time.sleep(0.3)  # as between the server's flushes: longer than mimalloc's own delay
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    writer.flush()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if flush >= 2:
        print(faults / len(items))
"""


def test_a_flush_reuses_the_memory_the_flush_before_it_freed(tmp_path: Path) -> None:
    """Each flush of image rows found its Parquet buffers in pages faulted in afresh
    (zeroed 2 MiB pages: 18 % of the writer's CPU) until the writer had Arrow's allocator
    keep freed pages (writer.ARROW_PAGES_KEPT)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _FLUSHES, str(tmp_path / "capture")],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    per_row = [float(line) for line in done.stdout.split()]
    assert len(per_row) == 5 and sorted(per_row)[2] < 0.1, per_row  # was 0.4-0.7 a row


@pytest.mark.parametrize("versions", [1, 2])
def test_image_rows_across_arena_chunks_read_back_as_served(tmp_path: Path, versions: int) -> None:
    """Rows whose inputs lie end to end in arena chunks (joined without a copy), across
    chunk ends; with two versions of one config their rows interleave in one arena and
    are joined by a copy. Either way each row reads back as it was served."""
    import dataclasses

    import pyarrow.parquet as pq

    from loadtests.capture_cost import answered

    items = answered("image_classifier", 200)  # 48 KiB inputs: 2 chunk ends
    if versions == 2:
        items = [
            dataclasses.replace(a, served=dataclasses.replace(a.served, version_label=str(i % 2)))
            for i, a in enumerate(items)
        ]
    writer = writer_at(tmp_path, flush_s=3600, max_bytes=1 << 30)
    record = CaptureRecorder(writer, status_of=lambda error: "INTERNAL")
    for item in items:
        record(item)
    writer.close(60)
    name = items[0].served.spec.inputs[0].name
    got: dict[str, np.ndarray] = {}
    for path in files(tmp_path / "capture"):
        data = pq.read_table(path)
        for rid, value in zip(
            data.column("request_id").to_pylist(),
            data.column("inputs").combine_chunks().field(name).to_pylist(),
            strict=True,
        ):
            got[rid] = np.asarray(value, np.float32)
    assert len(got) == len(items)
    for item in items:
        sent = item.request.inputs[name]
        assert np.array_equal(got[item.request_id].reshape(sent.shape), sent)


TINY = """
name: "t"
platform: "onnxruntime_onnx"
max_batch_size: 256
input [ { name: "X" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 16 ] } ]
parameters [ { key: "capture_sample_rate" value { string_value: "1" } } ]
"""


def tiny_spec(tmp_path: Path, text: str = TINY) -> Any:
    folder = tmp_path / "t"
    folder.mkdir(exist_ok=True)
    (folder / "config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(folder), "t/config.pbtxt", "t")


def tiny_answered(spec: Any, request_id: str, own: bool, x: Any, y: Any) -> Any:
    from convoy.batching.request import InferRequest, InferResult
    from convoy.inference.path import Answered

    served = type("Served", (), {"spec": spec, "version_label": "1", "devices": ["cpu"]})()
    request = InferRequest(request_id, {"X": x}, ("Y",), x.shape[0], (), None,  # type: ignore[arg-type]
                           arrival_ns=1_000, dispatch_ns=5_000)  # fmt: skip
    return Answered("grpc", "c", request_id, served, "none", request, InferResult({"Y": y}),
                    None, False, 9_000, lambda: None, own)  # type: ignore[arg-type]  # fmt: skip


def test_a_request_kept_by_reference_reads_back_as_one_copied(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    writer = CaptureWriter(CaptureConfig(uri=str(tmp_path / "capture")))  # no thread:
    recorder = CaptureRecorder(writer, lambda e: "INTERNAL", wall_clock_ns=lambda: 7_000_000)
    x = np.frombuffer(np.arange(32, dtype=np.float32).tobytes(), np.float32).reshape(2, 16)
    y = x * 2
    recorder(tiny_answered(spec, "kept", True, x, y))
    recorder(tiny_answered(spec, "copied", False, x, y))
    (*_, how), (*_, split) = writer._queue  # flushed below, by hand
    assert how is None and split is False  # laid out on the writer's thread; on the loop
    writer.flush()
    (path,) = files(tmp_path / "capture")
    found = (
        duckdb.connect()
        .execute(
            f"SELECT request_id, timestamp, queue_us, compute_us, total_us, status, inputs, "
            f"outputs, shapes FROM '{path}' ORDER BY request_id DESC"
        )
        .fetchall()
    )
    assert found[0][0] == "kept" and found[1][0] == "copied"
    assert found[0][1:] == found[1][1:]
    assert found[0][2:5] == (4, 4, 8)
    assert found[0][6]["X"][1] == list(range(16, 32))
    assert found[0][7]["Y"][0] == [2.0 * v for v in range(16)]


def test_what_is_kept_by_reference(tmp_path: Path) -> None:
    from convoy.capture.recorder import _Plan

    def plan(text: str) -> _Plan:
        spec = tiny_spec(tmp_path, text)
        assert spec.capture is not None
        return _Plan(spec, spec.capture, 1 << 20, on_cpu)

    on_cpu = True
    assert plan(TINY).reference_rows == 63  # 64 bytes a row, each tensor under 4 KiB
    python = TINY.replace('platform: "onnxruntime_onnx"', 'backend: "convoy_python"')
    assert plan(python).reference_rows == 0  # a Python model may reuse its output buffers
    outputs_off = python.replace(
        "parameters [", 'parameters [ { key: "capture_outputs" value { string_value: "false" } },'
    )
    assert plan(outputs_off).reference_rows == 63  # its outputs are not kept at all
    hashed = TINY.replace(
        "parameters [", 'parameters [ { key: "capture_hash" value { string_value: "X" } },'
    )
    assert plan(hashed).reference_rows == 0  # hashed on the loop
    assert (
        plan(TINY.replace("dims: [ 16 ] } ]\noutput", "dims: [ -1 ] } ]\noutput")).reference_rows
        == 0
    )
    assert plan(TINY.replace("dims: [ 16 ]", "dims: [ 3, 64, 64 ]", 1)).reference_rows == 0
    unbatched = TINY.replace("max_batch_size: 256", "max_batch_size: 0")
    assert plan(unbatched).reference_rows == 1
    on_cpu = False  # a GPU instance's outputs lie in pinned blocks: copied
    assert plan(TINY).reference_rows == 0 and plan(outputs_off).reference_rows == 63


@pytest.mark.parametrize("own", [True, False])
def test_capture_outputs_false_writes_rows_without_answers(tmp_path: Path, own: bool) -> None:
    """Kept by reference (own inputs) or copied on the loop: the inputs are written, each
    output's field is null."""
    spec = tiny_spec(
        tmp_path,
        TINY.replace(
            "parameters [",
            'parameters [ { key: "capture_outputs" value { string_value: "false" } },',
        ),
    )
    writer = writer_at(tmp_path, flush_s=60)
    recorder = CaptureRecorder(writer, lambda e: "INTERNAL")
    x = np.frombuffer(np.arange(16, dtype=np.float32).tobytes(), np.float32).reshape(1, 16)
    recorder(tiny_answered(spec, "r", own, x, x * 2))
    writer.close(30)
    (path,) = files(tmp_path / "capture")
    ((inputs, outputs, status),) = (
        duckdb.connect().execute(f"SELECT inputs, outputs, status FROM '{path}'").fetchall()
    )
    assert inputs["X"] == [[float(v) for v in range(16)]] and status == "OK"
    assert outputs == {"Y": None}


def test_a_python_models_answer_is_copied_before_its_buffers_change(tmp_path: Path) -> None:
    spec = tiny_spec(
        tmp_path, TINY.replace('platform: "onnxruntime_onnx"', 'backend: "convoy_python"')
    )
    writer = writer_at(tmp_path, flush_s=60)
    recorder = CaptureRecorder(writer, lambda e: "INTERNAL")
    x = np.frombuffer(np.ones(16, np.float32).tobytes(), np.float32).reshape(1, 16)
    reused = np.zeros((1, 16), np.float32)  # the model's own buffer, answered and reused
    recorder(tiny_answered(spec, "r", True, x, reused))
    reused[:] = 5.0
    writer.close(30)
    (path,) = files(tmp_path / "capture")
    ((outputs,),) = duckdb.connect().execute(f"SELECT outputs FROM '{path}'").fetchall()
    assert outputs["Y"] == [[0.0] * 16]


def test_a_kept_answer_counts_its_whole_batch_once(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    writer = CaptureWriter(CaptureConfig(uri=str(tmp_path / "capture")))  # no thread
    recorder = CaptureRecorder(writer, lambda e: "INTERNAL")
    batch = np.zeros((32, 16), np.float32)  # one batch's output, 2 KiB, split by request
    x = np.frombuffer(bytes(64), np.float32).reshape(1, 16)
    for i in range(3):
        recorder(tiny_answered(spec, f"r{i}", True, x, batch[i : i + 1]))
    held = [nbytes for (*_, nbytes, _) in writer._queue]
    assert held == [512 + 128 + batch.nbytes, 512 + 128, 512 + 128]
    assert writer.snapshot()["buffered_bytes"] == sum(held)


def test_the_serve_flags_make_the_capture_config(capsys: pytest.CaptureFixture[str]) -> None:
    from convoy.cli import build_parser, capture_config

    parse = build_parser().parse_args
    assert capture_config(parse(["serve"])) is None  # off unless --capture-dir is given
    assert capture_config(parse(["serve", "--capture-dir", "s3://b/p"])) == CaptureConfig(
        uri="s3://b/p", flush_s=10.0, max_bytes=64 << 20, retention_days=0
    )
    given = parse(
        ["serve", "--capture-dir", "cap", "--capture-flush-secs", "2.5",
         "--capture-max-mib", "8", "--capture-retention-days", "30"]
    )  # fmt: skip
    assert capture_config(given) == CaptureConfig("cap", 2.5, 8 << 20, 30)
    for flag, value in [("--capture-max-mib", "0"), ("--capture-retention-days", "-1"),
                        ("--capture-flush-secs", "0")]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse(["serve", "--capture-dir", "cap", flag, value])
        assert flag in capsys.readouterr().err
