"""Labels and datasets without a server: labels written beside the requests, and
`convoy dataset export` over captured files (the join, the filters, the manifest, the
dataset_id's independence from files and write order, usage errors), read back with
DuckDB and pandas as a user would."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from convoy.capture.cli import run_dataset_command
from convoy.capture.exporter import CaptureCollector
from convoy.capture.recorder import LabelRecorder
from convoy.capture.writer import CaptureWriter
from convoy.cli import build_parser
from convoy.config import CaptureConfig
from convoy.errors import ModelNotFound

from .test_capture import row, spec_of

duckdb = pytest.importorskip("duckdb", reason="duckdb missing: a test extra")
pd = pytest.importorskip("pandas", reason="pandas missing: a test extra")

DAY = dt.datetime(2026, 12, 7, 5, 30, tzinfo=dt.UTC)


def us(at: dt.datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def capture_dir(tmp_path: Path, name: str = "capture", **settings: Any) -> CaptureWriter:
    writer = CaptureWriter(CaptureConfig(uri=str(tmp_path / name), flush_s=60, **settings))
    writer.open()
    return writer


def requests_of(spec: Any, count: int = 6) -> list[Any]:
    """r0..r5: versions 2 and 1 in turn, ten hours apart (05:30 on the 7th to 07:30 on
    the 9th); r4 refused."""
    rows = []
    for i in range(count):
        at = DAY + dt.timedelta(hours=10 * i)
        overrides: dict[str, Any] = {"timestamp_us": us(at), "version": "1" if i % 2 else "2"}
        if i == 4:
            overrides.update(status="INVALID_ARGUMENT", error="bad", inputs={}, outputs={})
        rows.append(row(spec, i, **overrides))
    return rows


def export(tmp_path: Path, *argv: str, now: dt.datetime = DAY) -> tuple[int, dict[str, Any]]:
    args = build_parser().parse_args(["dataset", "export", *argv])
    code = run_dataset_command(args, now=lambda: now)
    manifest_path = Path(args.out + ".manifest.json")
    manifest = json.loads(manifest_path.read_text()) if code == 0 else {}
    return code, manifest


# -- labels -------------------------------------------------------------------------------


def test_labels_of_each_kind_are_written_beside_the_requests_and_read_back(
    tmp_path: Path,
) -> None:
    writer = capture_dir(tmp_path)
    assert writer.put_label("m", "r1", 3, us(DAY), "1")  # class_index
    assert writer.put_label("m", "r2", 0.1 + 0.2, us(DAY) + 1, "2")  # value
    assert writer.put_label("m", "r3", "cat", us(DAY + dt.timedelta(days=1)), "1")  # class_label
    writer.close(30)
    labels = tmp_path / "capture" / "labels" / "model=m"
    days = sorted(p.name for p in labels.iterdir())
    assert days == ["date=2026-12-07", "date=2026-12-08"]
    assert all(p.suffix == ".parquet" for p in labels.rglob("*") if p.is_file())
    glob = f"{tmp_path}/capture/labels/**/*.parquet"
    got = duckdb.execute(
        f"SELECT model, request_id, label, kind, value, version, timestamp FROM "
        f"read_parquet('{glob}', hive_partitioning = true) ORDER BY request_id"
    ).fetchall()
    assert [g[:6] for g in got] == [
        ("m", "r1", "3", "class_index", 3.0, "1"),
        ("m", "r2", "0.30000000000000004", "value", 0.30000000000000004, "2"),
        ("m", "r3", "cat", "class_label", None, "1"),
    ]
    assert float(got[1][2]) == 0.1 + 0.2  # the text reads back to the same double
    assert got[0][6] == DAY
    frame = pd.read_parquet(tmp_path / "capture" / "labels")  # pandas: the directory as is
    assert sorted(frame["request_id"]) == ["r1", "r2", "r3"]
    assert writer.counts.labels == {"m": 3}


def test_labels_share_the_rows_budget_and_their_drops_are_counted(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path, max_bytes=1300)
    writer.flush = lambda: None  # type: ignore[method-assign]  # nothing leaves the buffer
    assert writer.put(*row(spec, 0))  # 1000 bytes
    assert writer.put_label("m", "r0", 1, us(DAY))
    assert not writer.put_label("m", "r" * 200, 1, us(DAY))
    assert writer.counts.labels_dropped == {("m", "buffer_full"): 1}
    metrics = {m.name: m for m in CaptureCollector(writer.counts).collect()}
    (sample,) = metrics["convoy_capture_labels_dropped"].samples
    assert sample.labels == {"model": "m", "reason": "buffer_full"} and sample.value == 1
    writer.close(30)


def test_a_failing_label_write_is_counted(tmp_path: Path) -> None:
    writer = capture_dir(tmp_path)
    (tmp_path / "capture" / "labels").write_text("a file where the labels folder goes")
    writer.put_label("m", "r0", 1, us(DAY))
    writer.flush()
    assert writer.counts.labels_dropped == {("m", "write_error"): 1}
    writer.close(30)


def test_labels_are_kept_only_for_models_that_capture(tmp_path: Path) -> None:
    capturing = spec_of(tmp_path, capture_sample_rate="0.1")
    plain = spec_of(tmp_path, drift_seed="1")
    served = {("on", "1"): capturing, ("on", ""): capturing, ("off", "1"): plain,
              ("gone", ""): capturing}  # fmt: skip

    def spec_of_version(model: str, version: str) -> Any:
        if (model, version) not in served:
            raise ModelNotFound(f"{model}:{version}")
        return served[(model, version)]

    put: list[tuple[Any, ...]] = []
    writer: Any = type("W", (), {"put_label": lambda self, *a: put.append(a)})()
    record = LabelRecorder(writer, spec_of_version, wall_clock_us=lambda: 7)
    record("on", "1", "a", 2)
    record("off", "1", "b", 2)  # no capture_sample_rate: not kept
    record("gone", "3", "c", "x")  # version 3 no longer serves: the default version decides
    record("unknown", "1", "d", 1.5)  # not loaded at all: nothing, and no error
    assert put == [("on", "a", 2, 7, "1"), ("gone", "c", "x", 7, "3")]


# -- export -------------------------------------------------------------------------------


def test_export_joins_each_request_with_its_latest_label(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path)
    for r in requests_of(spec):
        writer.put(*r)
    writer.put_label("m", "r0", 1, us(DAY))
    writer.put_label("m", "r0", 2, us(DAY) + 5)  # the later label wins
    writer.put_label("m", "r3", "dog", us(DAY + dt.timedelta(days=30)))  # weeks later
    writer.put_label("m", "r4", 1, us(DAY))  # a refused request: not exported at all
    writer.put_label("m", "elsewhere", 1, us(DAY))  # a request not captured
    writer.close(30)
    out = tmp_path / "out" / "ds.parquet"
    code, manifest = export(
        tmp_path, "m", "--capture-dir", str(tmp_path / "capture"), "--with-labels",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert manifest["rows"] == 5 and manifest["versions"] == ["1", "2"]
    assert manifest["label_coverage"] == pytest.approx(2 / 5)
    assert manifest["since"] is None and manifest["until"] is None
    assert len(manifest["dataset_id"]) == 64
    assert manifest["command"] == (
        f"convoy dataset export m --capture-dir {tmp_path}/capture --with-labels --out {out}"
    )
    names = [field["name"] for field in manifest["schema"]]
    assert names[:4] == ["model", "version", "request_id", "timestamp"]
    assert names[-4:] == ["label", "label_kind", "label_value", "label_timestamp"]
    got = duckdb.execute(
        f"SELECT request_id, model, version, label, label_kind, label_value, inputs.X "
        f"FROM read_parquet('{out}')"
    ).fetchall()
    assert [g[0] for g in got] == ["r0", "r1", "r2", "r3", "r5"]  # by timestamp
    assert got[0][1:6] == ("m", "2", "2", "class_index", 2.0)
    assert got[0][6] == [[0.0, 1.0]]  # the tensors as captured
    assert got[3][3:6] == ("dog", "class_label", None)
    assert got[1][3] is None and got[4][3] is None
    frame = pd.read_parquet(out)
    assert list(frame["request_id"]) == ["r0", "r1", "r2", "r3", "r5"]
    assert frame["label"].notna().sum() == 2
    assert not list((tmp_path / "out").glob(".*"))  # no temporary left behind


def test_the_dataset_id_depends_on_the_rows_not_on_the_files(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    rows = requests_of(spec)
    at_once = capture_dir(tmp_path, "once")
    for r in rows:
        at_once.put(*r)
    at_once.close(30)
    piecewise = capture_dir(tmp_path, "piecewise")  # reversed, one flush (file) per row
    for r in reversed(rows):
        piecewise.put(*r)
        piecewise.flush()
    piecewise.close(30)
    assert len(list((tmp_path / "piecewise").rglob("*.parquet"))) == 6
    ids = []
    for capture, out in (("once", "a"), ("piecewise", "b"), ("once", "c")):
        code, manifest = export(
            tmp_path, "m", "--capture-dir", str(tmp_path / capture),
            "--out", str(tmp_path / f"{out}.parquet"),
        )  # fmt: skip
        assert code == 0
        ids.append(manifest["dataset_id"])
    assert ids[0] == ids[1] == ids[2]
    a, b = (duckdb.execute(f"SELECT * FROM '{tmp_path}/{n}.parquet'").fetchall() for n in "ab")
    assert a == b  # the same rows in the same order
    again = export(tmp_path, "m", "--capture-dir", str(tmp_path / "once"), "--out",
                   str(tmp_path / "a.parquet"))[1]  # fmt: skip
    assert again == export(tmp_path, "m", "--capture-dir", str(tmp_path / "once"), "--out",
                           str(tmp_path / "a.parquet"))[1]  # fmt: skip
    later = export(tmp_path, "m", "--capture-dir", str(tmp_path / "once"), "--since",
                   "2026-12-08", "--out", str(tmp_path / "d.parquet"))[1]  # fmt: skip
    assert later["dataset_id"] != ids[0] and later["rows"] == 3


def test_version_since_and_until_select_rows(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path)
    for r in requests_of(spec):
        writer.put(*r)
    writer.close(30)
    base = ["m", "--capture-dir", str(tmp_path / "capture"), "--out", str(tmp_path / "o.parquet")]

    def ids(*flags: str, now: dt.datetime = DAY) -> list[str]:
        assert export(tmp_path, *base, *flags, now=now)[0] == 0
        got = duckdb.execute(f"SELECT request_id FROM '{tmp_path}/o.parquet'").fetchall()
        return [r[0] for r in got]

    assert ids("--version", "1") == ["r1", "r3", "r5"]
    assert ids("--version", "2") == ["r0", "r2"]  # r4 (version 2) was refused
    # r1 at 15:30 on the 7th .. r3 at 11:30 on the 8th; --until is exclusive
    assert ids("--since", "2026-12-07T15:30:00Z", "--until", "2026-12-08T11:30") == ["r1", "r2"]
    assert ids("--since", "2026-12-08T06:30:00+01:00") == ["r3", "r5"]  # 05:30 UTC
    now = DAY + dt.timedelta(days=2)  # 05:30 on the 9th
    assert ids("--since", "24h", now=now) == ["r3", "r5"]  # an age counts back from now
    manifest = json.loads((tmp_path / "o.parquet.manifest.json").read_text())
    assert manifest["since"] == "2026-12-08T05:30:00Z"  # what the age meant, recorded
    assert "--since 24h" in manifest["command"]


def test_files_of_different_schemas_are_read_as_one(tmp_path: Path) -> None:
    """A config that stopped excluding an input: its field is null in the older rows."""
    without = spec_of(tmp_path, capture_sample_rate="1", capture_exclude="EMAIL")
    writer = capture_dir(tmp_path)
    writer.put(*row(without, 0, timestamp_us=us(DAY)))
    writer.flush()
    with_email = spec_of(tmp_path, capture_sample_rate="1")
    writer.put(*row(with_email, 1, timestamp_us=us(DAY) + 1, version="2"))
    writer.close(30)
    out = tmp_path / "o.parquet"
    code, _ = export(tmp_path, "m", "--capture-dir", str(tmp_path / "capture"), "--out", str(out))
    assert code == 0
    got = duckdb.execute(f"SELECT request_id, inputs.EMAIL FROM '{out}'").fetchall()
    assert got == [("r0", None), ("r1", [[b"a@b.c"], [b"a@b.c"]])]


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--since", "yesterday"], "--since"),
        (["--until", "2026-13-01"], "--until"),
        (["--version", "one"], "--version"),
        (["--version", "0"], "--version"),
        (["--since", "2026-12-08", "--until", "2026-12-07"], "--since"),
    ],
)
def test_a_bad_flag_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], flag: str
) -> None:
    capture_dir(tmp_path).close(30)
    argv = ["m", "--capture-dir", str(tmp_path / "capture"), "--out", str(tmp_path / "o"), *flags]
    try:
        code = export(tmp_path, *argv)[0]
    except SystemExit as exited:  # refused while parsing
        code = exited.code  # type: ignore[assignment]
    assert code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_flag_or_capture_dir_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["dataset", "export", "m", "--capture-dir", str(tmp_path)])
    assert exited.value.code == 2 and "--out" in capsys.readouterr().err
    code, _ = export(
        tmp_path, "m", "--capture-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "--capture-dir" in capsys.readouterr().err


def test_an_out_no_filesystem_writes_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path)
    writer.put(*row(spec, 0))
    writer.close(30)
    code, _ = export(
        tmp_path, "m", "--capture-dir", str(tmp_path / "capture"), "--out", "nosuch://b/o.parquet"
    )
    assert code == 2 and "--out" in capsys.readouterr().err


def test_no_matching_rows_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path)
    writer.put(*row(spec, 0, timestamp_us=us(DAY)))
    writer.close(30)
    base = ["--capture-dir", str(tmp_path / "capture"), "--out", str(tmp_path / "o")]
    assert export(tmp_path, "other", *base)[0] == 1
    assert "model 'other'" in capsys.readouterr().err
    assert export(tmp_path, "m", *base, "--since", "2027-01-01")[0] == 1
    assert "no answered requests" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_retention_removes_old_label_partitions_too(tmp_path: Path) -> None:
    now = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC).timestamp()
    config = CaptureConfig(uri=str(tmp_path / "capture"), retention_days=2)
    writer = CaptureWriter(config, clock=lambda: now)
    writer.open()
    base = tmp_path / "capture" / "labels" / "model=m"
    for day in ("2026-12-01", "2026-12-05", "2026-12-07"):
        (base / f"date={day}").mkdir(parents=True)
    writer._prune()
    writer.close(30)
    assert sorted(p.name for p in base.iterdir()) == ["date=2026-12-05", "date=2026-12-07"]


def test_the_dataset_id_does_not_depend_on_which_version_s_file_comes_first(
    tmp_path: Path,
) -> None:
    """Versions of different dims: each file's tensor fields carry their own shape
    metadata, and the id must not depend on whose the unified schema keeps."""
    import numpy as np

    from convoy.capture.rows import SCALARS
    from convoy.config import read_model_config, validate_model_config

    from .test_capture import CONFIG

    one = spec_of(tmp_path, capture_sample_rate="1")
    folder = tmp_path / "wide" / "m"
    folder.mkdir(parents=True)
    text = CONFIG.format(params='{ key: "capture_sample_rate" value { string_value: "1" } }')
    (folder / "config.pbtxt").write_text(text.replace("dims: [ 2 ] }},", "dims: [ 3 ] }},")
                                         .replace("dims: [ 2 ] }", "dims: [ 3 ] }"))  # fmt: skip
    two = validate_model_config(read_model_config(folder), "m/config.pbtxt", "m")
    first = row(one, 0, timestamp_us=us(DAY))
    outputs = {"Y": np.ones((1, 3), np.float32)}
    _, _, narrow, _ = row(two, 1)
    inputs = {t.name: value for t, value in zip(two.inputs, narrow[len(SCALARS) :], strict=False)}
    inputs["X"] = np.ones((1, 3), np.float32)
    second = row(two, 1, timestamp_us=us(DAY) + 1, version="2", inputs=inputs, outputs=outputs)
    ids = []
    for name, order in (("a", (first, second)), ("b", (second, first))):
        writer = capture_dir(tmp_path, name)
        for r in order:
            writer.put(*r)
            writer.flush()
        writer.close(30)
        files = sorted((tmp_path / name).rglob("*.parquet"))
        assert len(files) == 2
        for i, path in enumerate(files):  # names that sort the other way round
            prefix = "a" if (name == "a") == (i == 1) else "z"
            path.rename(path.with_name(f"{prefix}{path.name}"))
        code, manifest = export(
            tmp_path, "m", "--capture-dir", str(tmp_path / name),
            "--out", str(tmp_path / f"{name}.parquet"),
        )  # fmt: skip
        assert code == 0 and manifest["rows"] == 2
        ids.append(manifest["dataset_id"])
    assert ids[0] == ids[1]


def test_the_server_s_own_replay_traffic_is_not_exported(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path)
    writer.put(*row(spec, 0, timestamp_us=us(DAY)))
    writer.put(*row(spec, 1, timestamp_us=us(DAY) + 1, transport="replay", request_id="replay:r0"))
    writer.put(*row(spec, 2, timestamp_us=us(DAY) + 2, request_id="replay:r0"))
    writer.close(30)
    out = tmp_path / "o.parquet"
    code, manifest = export(
        tmp_path, "m", "--capture-dir", str(tmp_path / "capture"), "--out", str(out)
    )
    assert code == 0 and manifest["rows"] == 1
    assert duckdb.execute(f"SELECT request_id FROM '{out}'").fetchall() == [("r0",)]


def test_a_corrupt_parquet_file_exits_2_naming_the_capture_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_of(tmp_path, capture_sample_rate="1")
    writer = capture_dir(tmp_path)
    writer.put(*row(spec, 0, timestamp_us=us(DAY)))
    writer.close(30)
    (written,) = (tmp_path / "capture" / "requests").rglob("*.parquet")
    (written.parent / "corrupt.parquet").write_bytes(b"PAR1 not really")
    base = ["--capture-dir", str(tmp_path / "capture"), "--out", str(tmp_path / "o")]
    code = export(tmp_path, "m", *base)[0]
    err = capsys.readouterr().err
    assert code == 2 and "--capture-dir" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
