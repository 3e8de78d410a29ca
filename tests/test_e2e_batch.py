"""`convoy batch` end to end: rows scored in process and against a live server equal the
answers the server gives the same rows online (tritonclient), bitwise; a job killed with
SIGKILL and resumed holds every id exactly once; refused rows go to the dead letters.

`lin` computes y = 2x except on 13, which it refuses (the model raises); `slow` is the
same, 20 ms a batch, so a job on it can be killed half way.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from .conftest import ROOT, ServerProcess, make_repository, start_server
from .linear import write_linear_model

pytestmark = pytest.mark.e2e
pa = pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow missing: a dependency of convoy")

LIN = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        if (x == 13).any():
            raise ValueError("13 is refused")
        time.sleep({delay})
        return {{"Y": x * 2}}
"""
ROWS = 300
TEXT = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        text = inputs["TEXT"]
        return {
            "LEN": np.vectorize(len, otypes=[np.int32])(text),
            "UPPER": np.vectorize(lambda b: b.upper(), otypes=[object])(text),
        }
"""
TEXT_CONFIG = """
name: "text"
backend: "convoy_python"
max_batch_size: 16
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "LEN" data_type: TYPE_INT32 dims: [ 1 ] },
         { name: "UPPER" data_type: TYPE_STRING dims: [ 1 ] } ]
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("batch-repo")
    make_repository(root, examples_dir, ("tiny",))
    write_linear_model(root, "lin", {1: LIN.format(delay=0)}, max_batch_size=8)
    write_linear_model(root, "slow", {1: LIN.format(delay=0.02)}, max_batch_size=4)
    (root / "text" / "1").mkdir(parents=True)
    (root / "text" / "1" / "model.py").write_text(TEXT)
    (root / "text" / "config.pbtxt").write_text(TEXT_CONFIG)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    proc = start_server(repository)
    yield proc
    assert proc.stop() == 0, proc.output()


def batch(*argv: str) -> tuple[int, dict[str, Any], str]:
    """`convoy batch ARGV` in this process (a subprocess costs seconds of imports):
    exit status, JSON summary, stderr."""
    from convoy.batch.cli import run_batch
    from convoy.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    code = run_batch(build_parser().parse_args(["batch", *argv]), out, err)
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}, err.getvalue()


def tiny_input(path: Path, rows: int = ROWS) -> np.ndarray:
    x = np.random.default_rng(7).standard_normal((rows, 16)).astype(np.float32)
    table = pa.table(
        {
            "key": [f"r{i}" for i in range(rows)],
            "INPUT0": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16),
            "note": [f"n{i}" for i in range(rows)],
        }
    )
    pq.write_table(table, path)
    return x


def online(server: ServerProcess, model: str, name: str, x: np.ndarray, out: str) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        answers = []
        for start in range(0, len(x), 7):  # batches unlike the job's
            rows = x[start : start + 7]
            tensor = grpcclient.InferInput(name, list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            answers.append(client.infer(model, [tensor]).as_numpy(out))
        return np.concatenate(answers)
    finally:
        client.close()


def read_output(path: Path) -> pa.Table:
    import pyarrow.dataset as ds

    return ds.dataset(str(path), format="parquet").to_table()


@pytest.mark.parametrize("where", ["in-process", "server"])
def test_outputs_equal_the_online_answers(
    where: str, server: ServerProcess, repository: Path, tmp_path: Path
) -> None:
    x = tiny_input(tmp_path / "in.parquet")
    source = (
        ["--server", server.url] if where == "server" else ["--model-repository", str(repository)]
    )
    code, summary, err = batch(
        "tiny", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--id-column", "key", "--keep", "note", "--batch-size", "64", *source,
    )  # fmt: skip
    assert code == 0, err
    assert summary["rows"] == ROWS and summary["errors"] == 0 and summary["rows/s"] > 0
    table = read_output(tmp_path / "out").sort_by("key")
    assert table.column_names == ["key", "note", "OUTPUT0"]
    order = np.argsort([f"r{i}" for i in range(ROWS)])
    scored = np.stack(table.column("OUTPUT0").to_numpy(zero_copy_only=False))
    expected = online(server, "tiny", "INPUT0", x, "OUTPUT0")[order]
    assert scored.dtype == np.float32
    assert scored.tobytes() == expected.tobytes()  # bitwise
    assert table.column("note").to_pylist() == [f"n{i}" for i in order]
    manifest = json.loads((tmp_path / "out" / "_convoy_batch.json").read_text())
    assert manifest["model"] == "tiny" and manifest["rows"] == ROWS and manifest["complete"]
    assert manifest["input"] == str(tmp_path / "in.parquet")


@pytest.mark.parametrize("where", ["in-process", "server"])
def test_text_in_and_out_equal_the_online_answers(
    where: str, server: ServerProcess, repository: Path, tmp_path: Path
) -> None:
    words = [f"word {i} é" for i in range(40)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"n": i, "body": w}) + "\n" for i, w in enumerate(words)))
    door = (
        ["--server", server.url] if where == "server" else ["--model-repository", str(repository)]
    )
    code, summary, err = batch(
        "text", "--input", str(source), "--output", str(tmp_path / "out"), "--map", "body=TEXT",
        "--id-column", "n", *door,
    )  # fmt: skip
    assert code == 0 and summary["rows"] == 40, err
    table = read_output(tmp_path / "out").sort_by("n")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        tensor = grpcclient.InferInput("TEXT", [16, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[w.encode()] for w in words[:16]], dtype=object))
        online = client.infer("text", [tensor])
    finally:
        client.close()
    assert table.column("UPPER").to_pylist()[:16] == online.as_numpy("UPPER").tolist()
    assert table.column("LEN").to_pylist()[:16] == online.as_numpy("LEN").tolist()
    assert table.column("UPPER").to_pylist()[39] == ["WORD 39 é".encode()]


def test_duckdb_reads_the_output(repository: Path, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb missing (the test extra has it)")
    tiny_input(tmp_path / "in.parquet", 40)
    code, _, err = batch(
        "tiny", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository),
    )  # fmt: skip
    assert code == 0, err
    count, ids, first = duckdb.sql(
        f"select count(*), count(distinct id), min(len(OUTPUT0)) "
        f"from read_parquet('{tmp_path / 'out'}/*.parquet')"
    ).fetchall()[0]
    assert (count, ids, first) == (40, 40, 16)


def lin_table(rows: int, bad: tuple[int, ...] = ()) -> pa.Table:
    values = [13.0 if i in bad else float(i % 50) + 0.5 for i in range(rows)]
    return pa.table({"id": [f"row-{i}" for i in range(rows)], "x": values})


def test_refused_rows_go_to_the_dead_letters(repository: Path, tmp_path: Path) -> None:
    pq.write_table(lin_table(100, bad=(5, 41, 42)), tmp_path / "in.parquet")
    dead = tmp_path / "dead"
    code, summary, err = batch(
        "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository), "--map", "x=X", "--id-column", "id",
        "--dead-letter", str(dead), "--concurrency", "4",
    )  # fmt: skip
    assert code == 0, err
    assert (summary["rows"], summary["errors"]) == (97, 3)
    letters = [json.loads(line) for f in sorted(dead.glob("*.jsonl")) for line in f.open()]
    assert sorted(x["id"] for x in letters) == ["row-41", "row-42", "row-5"]
    assert all("13 is refused" in x["error"] for x in letters)
    out = read_output(tmp_path / "out")
    assert out.num_rows == 97 and "row-5" not in out.column("id").to_pylist()
    y = dict(zip(out.column("id").to_pylist(), out.column("Y").to_pylist(), strict=True))
    assert y["row-6"] == [2 * 6.5]


def test_a_job_in_process_is_captured_as_the_batch_door(tmp_path: Path) -> None:
    """--capture-dir: each request the job sends is a row with the transport `batch`, the
    refused ones too (status and error), read back with DuckDB as capture's users do."""
    duckdb = pytest.importorskip("duckdb", reason="duckdb missing (the test extra has it)")
    root = write_linear_model(
        tmp_path / "repo", "cap", {1: LIN.format(delay=0)}, max_batch_size=8,
        parameters={"capture_sample_rate": "1"},
    )  # fmt: skip
    pq.write_table(lin_table(30, bad=(7,)), tmp_path / "in.parquet")
    capture = tmp_path / "capture"
    code, summary, err = batch(
        "cap", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(root), "--map", "x=X", "--id-column", "id",
        "--batch-size", "8", "--capture-dir", str(capture),
    )  # fmt: skip
    assert code == 0, err
    assert (summary["rows"], summary["errors"]) == (29, 1)
    assert summary["capture"]["dropped"] == {} and summary["capture"]["files"] >= 1
    rows = duckdb.sql(
        f"SELECT request_id, transport, status, error, inputs.X, outputs.Y, version "
        f"FROM read_parquet('{capture}/requests/**/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert {r[1] for r in rows} == {"batch"} and {str(r[6]) for r in rows} == {"1"}
    answered = sorted(x[0] for r in rows if r[2] == "OK" for x in r[4])
    assert answered == sorted(float(i % 50) + 0.5 for i in range(30) if i != 7)
    ok = [(r[4], r[5]) for r in rows if r[2] == "OK"]
    assert all(y == [2 * x[0]] for xs, ys in ok for x, y in zip(xs, ys, strict=True))
    refused = [r for r in rows if r[2] != "OK"]  # the bisection's requests holding row 7
    assert refused and all(r[2] == "INTERNAL" and "13 is refused" in r[3] for r in refused)
    assert [[13.0]] in [r[4] for r in refused]  # bisected down to the bad row alone
    assert summary["capture"]["rows"] == len(rows)


def test_capture_dir_is_for_a_job_in_process(repository: Path, tmp_path: Path) -> None:
    code, _, err = batch(
        "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--server", "127.0.0.1:1", "--capture-dir", str(tmp_path / "capture"),
    )  # fmt: skip
    assert code == 2 and "--capture-dir: a --server captures" in err
    pq.write_table(lin_table(4), tmp_path / "in.parquet")
    (tmp_path / "file").write_text("in the way")
    code, _, err = batch(
        "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository), "--map", "x=X",
        "--capture-dir", str(tmp_path / "file" / "capture"),
    )  # fmt: skip
    assert code == 2 and "--capture-dir: " in err, err


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_output_that_cannot_be_written_is_refused_before_any_row(
    where: str, repository: Path, tmp_path: Path
) -> None:
    tiny_input(tmp_path / "in.parquet", 8)
    (tmp_path / "file").write_text("in the way")
    out = str(tmp_path / "file" / "out") if where == "under a file" else "http://127.0.0.1:9/out"
    code, summary, err = batch(
        "tiny", "--input", str(tmp_path / "in.parquet"), "--output", out,
        "--model-repository", str(repository),
    )  # fmt: skip
    assert code == 2 and summary == {}
    assert f"convoy batch: --output {out}: cannot write there: " in err


def test_max_errors_stops_the_job(repository: Path, tmp_path: Path) -> None:
    pq.write_table(lin_table(400, bad=tuple(range(0, 400, 10))), tmp_path / "in.parquet")
    code, summary, err = batch(
        "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository), "--map", "x=X", "--max-errors", "5",
    )  # fmt: skip
    assert code == 1, err
    assert "--max-errors 5" in err
    assert summary["total_errors"] > 5 and summary["rows"] < 360


def test_values_that_do_not_convert_are_dead_letters(repository: Path, tmp_path: Path) -> None:
    table = pa.table({"X": pa.array([[1.0], [2.0, 3.0], None, [4.0]], pa.list_(pa.float64()))})
    pq.write_table(table, tmp_path / "in.parquet")
    code, summary, err = batch(
        "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository),
    )  # fmt: skip
    assert code == 0, err
    assert (summary["rows"], summary["errors"]) == (2, 2)
    letters = [
        json.loads(line)
        for f in sorted((tmp_path / "out" / "_dead_letter").glob("*.jsonl"))
        for line in f.open()
    ]
    assert {x["id"]: x["error"] for x in letters} == {
        1: "column 'X' -> input 'X': 2 values, the input takes 1 ([1])",
        2: "column 'X' -> input 'X': null",
    }
    assert read_output(tmp_path / "out").column("Y").to_pylist() == [[2.0], [8.0]]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_csv_and_jsonl_inputs(kind: str, repository: Path, tmp_path: Path) -> None:
    path = tmp_path / f"in.{kind}"
    if kind == "csv":
        path.write_text("id,x,label\n" + "".join(f"a{i},{i}.5,l{i}\n" for i in range(20)))
    else:
        path.write_text(
            "".join(
                json.dumps({"id": f"a{i}", "x": i + 0.5, "label": f"l{i}"}) + "\n"
                for i in range(20)
            )
        )
    code, summary, err = batch(
        "lin", "--input", str(path), "--output", str(tmp_path / "out"), "--format", kind,
        "--model-repository", str(repository), "--map", "x=X", "--id-column", "id",
        "--keep", "label",
    )  # fmt: skip
    assert code == 0, err
    assert summary["rows"] == 20
    written = tmp_path / "out" / f"part-00000.{kind}"
    if kind == "csv":
        lines = written.read_text().splitlines()
        assert lines[0] == '"id","label","Y"'
        assert lines[3] == '"a2","l2","[5.0]"'
    else:
        rows = [json.loads(line) for line in written.read_text().splitlines()]
        assert rows[2] == {"id": "a2", "label": "l2", "Y": [5.0]}


def test_bad_mappings_are_refused_before_any_row(repository: Path, tmp_path: Path) -> None:
    pair = pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0]), 2)
    pq.write_table(pa.table({"x": [1.0], "text": ["a"], "v": pair}), tmp_path / "in.parquet")
    cases = {
        ("--map", "nope=X"): "--map nope=X: the input has no column 'nope'",
        ("--map", "x=Z"): "--map x=Z: model 'lin' has no input 'Z' (inputs: X)",
        ("--map", "text=X"): "column 'text' (string) cannot feed input 'X' (FP32 [1])",
        ("--map", "v=X"): "column 'v' (fixed_size_list<element: double>[2]) cannot feed input 'X'",
        (): "model input 'X' has no column",
        ("--map", "x=X", "--keep", "zz"): "--keep zz: the input has no such column",
        ("--map", "x=X", "--id-column", "zz"): "--id-column zz: the input has no such column",
        ("--map", "x=X", "--batch-size", "9"): "--batch-size 9: model 'lin' takes at most 8",
        ("--map", "x=X", "--version", "7"): "--version 7: model 'lin' has no version 7",
    }
    for extra, message in cases.items():
        code, _, err = batch(
            "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--model-repository", str(repository), *extra,
        )  # fmt: skip
        assert code == 2 and message in err, (extra, err)
        assert not (tmp_path / "out" / "_convoy_batch.json").exists()
    code, _, err = batch(
        "lin", "--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository),
    )  # fmt: skip
    assert code == 2 and "--input" in err and "no such file" in err


def test_an_existing_output_needs_resume(repository: Path, tmp_path: Path) -> None:
    pq.write_table(lin_table(20), tmp_path / "in.parquet")
    argv = (
        "lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--model-repository", str(repository), "--map", "x=X", "--id-column", "id",
    )  # fmt: skip
    assert batch(*argv)[0] == 0
    code, _, err = batch(*argv)
    assert code == 2 and "add --resume" in err
    code, summary, err = batch(*argv, "--resume")
    assert code == 0, err
    assert summary["rows"] == 0 and summary["total_rows"] == 20  # nothing scored again
    code, _, err = batch(*argv[:-2], "--resume")
    assert code == 2 and "--resume: the output was written by another job" in err


def test_a_busy_server_is_tried_again(repository: Path, tmp_path: Path) -> None:
    """A queue of 2 requests and 8 batches in flight: RESOURCE_EXHAUSTED, retried."""
    busy = start_server(repository, "--max-queue-size", "2")
    try:
        pq.write_table(lin_table(160), tmp_path / "in.parquet")
        code, summary, err = batch(
            "slow", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--server", busy.url, "--map", "x=X", "--id-column", "id", "--concurrency", "8",
        )  # fmt: skip
    finally:
        assert busy.stop() == 0, busy.output()
    assert code == 0, err
    assert (summary["rows"], summary["errors"]) == (160, 0) and summary["retries"] > 0
    out = read_output(tmp_path / "out")
    values = dict(zip(out.column("id").to_pylist(), out.column("Y").to_pylist(), strict=True))
    assert values == {f"row-{i}": [2 * ((i % 50) + 0.5)] for i in range(160)}


def test_killed_job_resumes_every_id_exactly_once(repository: Path, tmp_path: Path) -> None:
    rows = 640  # 10 parts of 64 rows (16 batches of 4), 20 ms a batch
    pq.write_table(lin_table(rows), tmp_path / "in.parquet")
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "convoy.cli", "batch", "slow",
        "--input", str(tmp_path / "in.parquet"), "--output", str(out),
        "--model-repository", str(repository), "--map", "x=X",
        "--id-column", "id", "--concurrency", "1",
    ]  # fmt: skip
    job = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = out / "_convoy_batch.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["parts"]) >= 2:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed"
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    before = json.loads(manifest.read_text())
    assert 2 <= len(before["parts"]) < 10 and not before["complete"]
    done = subprocess.run(
        [*argv, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rows"] == rows - before["rows"]  # finished parts were not scored again
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == rows and set(ids) == {f"row-{i}" for i in range(rows)}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.name.startswith(".")]


def test_input_and_output_in_an_object_store(repository: Path, s3_query: str) -> None:
    """s3:// URIs (moto's S3-compatible server on loopback): read, written part by part
    with the manifest, and resumed there."""
    import pyarrow.dataset as ds

    from convoy.capture.writer import open_filesystem

    query = s3_query
    filesystem, _ = open_filesystem(f"s3://data{query}")
    with filesystem.open_output_stream("data/rows/in.parquet") as out:
        pq.write_table(lin_table(30, bad=(4,)), out)
    argv = (
        "lin", "--input", f"s3://data/rows/in.parquet{query}",
        "--output", f"s3://data/scored{query}", "--model-repository", str(repository),
        "--map", "x=X", "--id-column", "id",
    )  # fmt: skip
    code, summary, err = batch(*argv)
    assert code == 0, err
    assert (summary["rows"], summary["errors"]) == (29, 1)
    scored = ds.dataset("data/scored", filesystem=filesystem, format="parquet").to_table()
    assert sorted(scored.column("id").to_pylist()) == sorted(
        f"row-{i}" for i in range(30) if i != 4
    )
    with filesystem.open_input_stream("data/scored/_dead_letter/part-00000.jsonl") as f:
        assert json.loads(f.read())["id"] == "row-4"
    code, summary, err = batch(*argv, "--resume")
    assert code == 0 and summary["rows"] == 0 and summary["total_rows"] == 29, err
