"""convoy.batch's parts on their own: column mapping and conversion, the input's parts,
the output's files and manifest, retries, and a job over a fake model (bisecting a
refused batch down to its bad rows)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convoy.batch.cli import BatchConfig, UsageError
from convoy.batch.engine import JobFailed, ModelSignature, Scorer
from convoy.batch.job import BatchJob, JobPlan, TooManyErrors
from convoy.batch.mapping import MappingError, convert, parse_map, plan
from convoy.batch.sink import Manifest, OutputError, Sink, encode, output_column
from convoy.batch.source import SourceError, open_source, parts
from convoy.capture.replay_targets import Backoff, Refused
from convoy.cli import build_parser
from convoy.config import TensorSpec
from convoy.pb import grpc_service_pb2 as pb

pa = pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow missing: a dependency of convoy")


def signature(*inputs: TensorSpec, max_batch_size: int = 8) -> ModelSignature:
    outputs = (TensorSpec("Y", "FP32", (1,)),)
    return ModelSignature("m", "1", inputs, outputs, max_batch_size, 1)


# -- mapping --------------------------------------------------------------------------------


def test_parse_map() -> None:
    assert parse_map(["a=X", "b=Y"]) == {"X": "a", "Y": "b"}
    with pytest.raises(MappingError, match="--map 'a': expected COLUMN=INPUT"):
        parse_map(["a"])
    with pytest.raises(MappingError, match="input 'X' is mapped twice"):
        parse_map(["a=X", "b=X"])


def test_plan_by_name_and_map_skipping_optional_inputs() -> None:
    sig = signature(
        TensorSpec("X", "FP32", (4,)),
        TensorSpec("T", "BYTES", (1,)),
        TensorSpec("O", "FP32", (1,), optional=True),
    )
    schema = pa.schema([("X", pa.list_(pa.float64())), ("text", pa.string())])
    bindings = plan(schema, sig, {"T": "text"})
    assert [(b.column, b.tensor.name) for b in bindings] == [("X", "X"), ("text", "T")]


@pytest.mark.parametrize(
    ("kind", "dims", "message"),
    [
        (pa.string(), (1,), "the values are string"),
        (pa.float32(), (4,), "a scalar column feeds only an input of one element"),
        (pa.list_(pa.float32(), 3), (4,), "3 values per row, the input takes 4"),
        (pa.list_(pa.list_(pa.list_(pa.float32()))), (4, 4), "3 levels of lists for 2"),
        (pa.bool_(), (1,), "the values are bool"),
    ],
)
def test_plan_refuses_what_cannot_feed_the_input(
    kind: pa.DataType, dims: tuple[int, ...], message: str
) -> None:
    sig = signature(TensorSpec("X", "FP32", dims))
    with pytest.raises(MappingError, match=r"column 'c' .* cannot feed input 'X'") as refused:
        plan(pa.schema([("c", kind)]), sig, {"X": "c"})
    assert message in str(refused.value)


def test_convert_lists_nested_lists_and_bytes() -> None:
    sig = signature(
        TensorSpec("F", "FP32", (4,)),
        TensorSpec("N", "INT64", (2, 2)),
        TensorSpec("T", "BYTES", (1,)),
    )
    table = pa.table(
        {
            "F": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12.0)), 4),
            "N": [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9], [10, 11]]],
            "T": ["a", "é", "c"],
        }
    )
    converted = convert(table, plan(table.schema, sig, {}))
    assert converted.errors == {
        2: "column 'N' -> input 'N': ragged nested lists, the input takes [2, 2]"
    }
    [(rows, inputs)] = converted.groups
    assert rows.tolist() == [0, 1]
    assert inputs["F"].dtype == np.float32 and inputs["F"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert inputs["N"].shape == (2, 2, 2) and inputs["N"][1].tolist() == [[5, 6], [7, 8]]
    assert inputs["T"].tolist() == [[b"a"], ["é".encode()]]


def test_convert_groups_rows_by_a_variable_dimension_and_refuses_bad_values() -> None:
    sig = signature(TensorSpec("V", "INT8", (-1,)))
    table = pa.table({"V": [[1, 2], [3], [4, 5], [300], None, [1.5]]})
    table = table.cast(pa.schema([("V", pa.list_(pa.float64()))]))
    converted = convert(table, plan(table.schema, sig, {}))
    assert converted.errors == {
        3: "column 'V' -> input 'V': a value out of range for INT8",
        4: "column 'V' -> input 'V': null",
        5: "column 'V' -> input 'V': a value out of range for INT8",
    }
    groups = {tuple(rows.tolist()): inputs["V"].tolist() for rows, inputs in converted.groups}
    assert groups == {(0, 2): [[1, 2], [4, 5]], (1,): [[3]]}


# -- the input ------------------------------------------------------------------------------


def test_parts_cut_across_record_batches_and_skip_finished_ones(tmp_path: Path) -> None:
    for i in range(3):  # three files of 10 rows: parts of 7 straddle them
        pq.write_table(pa.table({"x": list(range(i * 10, i * 10 + 10))}), tmp_path / f"{i}.parquet")
    (tmp_path / "_meta").write_text("not data")
    dataset = open_source(str(tmp_path))
    cut = [
        (p.index, p.first_row, p.table.column("x").to_pylist()) for p in parts(dataset, ["x"], 7)
    ]
    assert [c[:2] for c in cut] == [(0, 0), (1, 7), (2, 14), (3, 21), (4, 28)]
    assert [x for c in cut for x in c[2]] == list(range(30))
    skipped = [p.index for p in parts(dataset, ["x"], 7, frozenset({0, 2}))]
    assert skipped == [1, 3, 4]
    glob = open_source(str(tmp_path / "[12].parquet"))
    assert glob.to_table().num_rows == 20


def test_csv_and_jsonl_sources(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,y\n1,a\n2,b\n")
    (tmp_path / "a.jsonl").write_text('{"x": [1, 2], "y": "a"}\n{"x": [3], "y": "b"}\n')
    assert open_source(str(tmp_path / "a.csv")).to_table().column("y").to_pylist() == ["a", "b"]
    assert open_source(str(tmp_path / "a.jsonl")).to_table().column("x").to_pylist() == [
        [1, 2],
        [3],
    ]
    with pytest.raises(SourceError, match=r"--input .*: mixes formats"):
        open_source(str(tmp_path))
    with pytest.raises(SourceError, match="no file matches"):
        open_source(str(tmp_path / "*.parquet"))


# -- the output -----------------------------------------------------------------------------


def test_manifest_round_trip_and_what_a_resume_may_not_change() -> None:
    manifest = Manifest("in", "m", "1", 64, "parquet", "id", {0: {"rows": 60, "errors": 4}})
    document = json.loads(json.dumps(manifest.as_json()))
    assert (document["rows"], document["errors"], document["parts_done"]) == (60, 4, 1)
    again = Manifest.from_json(document)
    assert again == manifest
    other = Manifest("in", "m", "2", 64, "parquet", "id")
    assert other.differs(manifest) == ["version '2' (was '1')"]


def test_output_columns_in_capture_encoding() -> None:
    field, column = output_column(TensorSpec("E", "FP32", (2, 3)), np.ones((4, 2, 3), np.float32))
    assert column.type == pa.list_(pa.float32(), 6) and len(column) == 4
    assert json.loads(field.metadata[b"shape"]) == [2, 3]
    field, column = output_column(TensorSpec("V", "INT32", (-1,)), np.ones((2, 5), np.int32))
    assert column.type == pa.list_(pa.int32()) and column.to_pylist()[1] == [1] * 5
    _, column = output_column(TensorSpec("S", "BYTES", (1,)), np.array([[b"x"], [b"y"]], object))
    assert column.to_pylist() == [[b"x"], [b"y"]]


def test_sink_writes_parts_dead_letters_and_refuses_foreign_directories(tmp_path: Path) -> None:
    sink = Sink(str(tmp_path / "out"), None, "jsonl")
    assert sink.existing() is None
    sink.prepare()
    table = pa.table(
        {"id": [1, 2], "Y": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0]), 1)}
    )
    sink.write_part(3, table, [(7, "INVALID_ARGUMENT: bad")])
    assert (tmp_path / "out" / "part-00003.jsonl").read_text().splitlines() == [
        '{"id": 1, "Y": [1.0]}',
        '{"id": 2, "Y": [2.0]}',
    ]
    dead = tmp_path / "out" / "_dead_letter" / "part-00003.jsonl"
    assert json.loads(dead.read_text()) == {"id": 7, "error": "INVALID_ARGUMENT: bad"}
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary file left
    assert b'"[1.0]"' in encode(table, "csv")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files but no _convoy_batch\.json"):
        Sink(str(tmp_path / "other"), None, "parquet").existing()


# -- retries and a job over a fake model ----------------------------------------------------


class FakeTarget:
    """y = 2x; refuses a batch holding 13 (the model's error), or the first `busy` tries."""

    def __init__(self, busy: int = 0, code: str = "RESOURCE_EXHAUSTED") -> None:
        self.busy = busy
        self.code = code
        self.batches: list[int] = []

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if self.busy:
            self.busy -= 1
            raise Refused(self.code, "queue full")
        x = np.frombuffer(request.raw_input_contents[0], np.float32)
        self.batches.append(len(x))
        if (x == 13).any():
            raise Refused("INTERNAL", "13 is refused")
        response = pb.ModelInferResponse(model_name="m", model_version="1")
        response.outputs.add(name="Y", datatype="FP32", shape=[len(x), 1])
        response.raw_output_contents.append((x * 2).tobytes())
        return response

    async def close(self) -> None:
        pass


async def no_sleep(_: float) -> None:
    pass


def scorer(target: FakeTarget, attempts: int = 4) -> Scorer:
    sig = signature(TensorSpec("X", "FP32", (1,)))
    return Scorer(target, sig, Backoff(attempts, 0.01, 0.1), no_sleep)  # type: ignore[arg-type]


def test_busy_answers_are_tried_again_then_fail_the_job() -> None:
    x = {"X": np.ones((2, 1), np.float32)}
    target = FakeTarget(busy=3)
    assert asyncio.run(scorer(target).score(x, "r"))["Y"].tolist() == [[2.0], [2.0]]
    with pytest.raises(JobFailed, match="RESOURCE_EXHAUSTED: queue full \\(after 4 tries\\)"):
        asyncio.run(scorer(FakeTarget(busy=9)).score(x, "r"))
    with pytest.raises(JobFailed, match="NOT_FOUND"):
        asyncio.run(scorer(FakeTarget(busy=1, code="NOT_FOUND")).score(x, "r"))


def run_job(tmp_path: Path, values: list[float], max_errors: int | None = None) -> tuple[Any, ...]:
    pq.write_table(pa.table({"X": values}), tmp_path / "in.parquet")
    target = FakeTarget()
    sig = signature(TensorSpec("X", "FP32", (1,)))
    dataset = open_source(str(tmp_path / "in.parquet"))
    bindings = tuple(plan(dataset.schema, sig, {}))
    job_plan = JobPlan(sig, bindings, (), None, 8, 2, 32, max_errors)
    sink = Sink(str(tmp_path / "out"), None, "parquet")
    manifest = Manifest("in", "m", "1", 32, "parquet", None)
    job = BatchJob(job_plan, Scorer(target, sig), sink, manifest)  # type: ignore[arg-type]
    return job, target, dataset


def test_a_refused_batch_is_bisected_to_its_bad_rows(tmp_path: Path) -> None:
    values = [float(i) for i in range(40)]  # 13 and, in the second part, 33 -> 13
    values[33] = 13.0
    job, target, dataset = run_job(tmp_path, values)
    progress = asyncio.run(job.run(dataset))
    assert (progress.rows, progress.errors, progress.parts) == (38, 2, 2)
    out = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert out.column("id").to_pylist() == [i for i in range(32) if i != 13]
    assert out.column("Y").to_pylist()[:2] == [[0.0], [2.0]]
    # 4 full batches and the second part's one, and each refused one once more, alone
    assert target.batches.count(8) == 7
    letters = (tmp_path / "out" / "_dead_letter" / "part-00001.jsonl").read_text()
    assert json.loads(letters) == {"id": 33, "error": "INTERNAL: 13 is refused"}
    assert job.manifest.complete and sorted(job.manifest.parts) == [0, 1]


def test_max_errors_stops_after_the_part_that_passes_it(tmp_path: Path) -> None:
    job, _, dataset = run_job(tmp_path, [13.0] * 3 + [1.0] * 100, max_errors=2)
    with pytest.raises(TooManyErrors, match="3 rows refused, more than --max-errors 2"):
        asyncio.run(job.run(dataset))
    assert not job.manifest.complete and 0 in job.manifest.parts


def test_requests_are_background_work_for_every_output() -> None:
    from convoy.batch.engine import to_request
    from convoy.inference.codec import BACKGROUND_PARAMETER

    sig = signature(TensorSpec("X", "FP32", (1,)), TensorSpec("T", "BYTES", (1,)))
    inputs = {"X": np.ones((2, 1), np.float32), "T": np.array([[b"a"], [b"bc"]], object)}
    request = to_request(sig, inputs, "batch-0-2")
    assert request.parameters[BACKGROUND_PARAMETER].bool_param is True
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("X", "FP32", [2, 1]),
        ("T", "BYTES", [2, 1]),
    ]
    assert not request.outputs  # none named: every output


def test_a_progress_bar_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from convoy.batch.cli import _bar
    from convoy.batch.job import Progress, now

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _bar(io.StringIO(), 100, now(), 0) is None
    show = _bar(Terminal(), 100, now() - 1.0, 20)
    assert show is not None
    show(Progress(rows=25, errors=5, parts=1))
    bar = capsys.readouterr().err
    assert "rows/s ETA" in bar and "50/100" in bar


def test_a_part_of_refused_rows_keeps_the_output_columns(tmp_path: Path) -> None:
    job, _, dataset = run_job(tmp_path, [13.0] * 32 + [1.0] * 8)
    asyncio.run(job.run(dataset))
    empty = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    full = pq.read_table(tmp_path / "out" / "part-00001.parquet")
    assert empty.num_rows == 0 and full.num_rows == 8
    assert empty.schema.equals(full.schema)


def test_the_fast_path_and_the_general_one_agree() -> None:
    """Columns without nulls skip the per-element bookkeeping: same tensors, same errors
    as the general path that a null in the column takes."""
    sig = signature(TensorSpec("F", "INT8", (4,)), TensorSpec("V", "FP32", (-1,)))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4, 5, 6, 7, 300] * 2 + [0] * 4), 4)
    rows = [[1.0], [2.0, 3.0], [4.0], [5.0, 6.0]]
    clean = pa.table({"F": fixed, "V": pa.array([*rows, [7.0, 8.0]])})
    nulls = pa.table({"F": fixed, "V": pa.array([*rows, None])})
    out_of_range = "column 'F' -> input 'F': a value out of range for INT8"
    for table, last in ((clean, None), (nulls, "column 'V' -> input 'V': null")):
        converted = convert(table, plan(table.schema, sig, {}))
        expected = {1: out_of_range, 3: out_of_range} | ({4: last} if last else {})
        assert converted.errors == expected
        groups = {
            tuple(r.tolist()): {k: v.tolist() for k, v in i.items()} for r, i in converted.groups
        }
        assert groups[(0, 2)] == {"F": [[1, 2, 3, 4]] * 2, "V": [[1.0], [4.0]]}
        assert len(groups) == (2 if last is None else 1)


PRIORITY_PROBE = """
import os, sys, threading
def policy():
    return os.sched_getscheduler(0) == os.SCHED_IDLE, os.getpriority(os.PRIO_PROCESS, 0)
seen = {}
started = threading.Event()
def before():
    started.set()
    lowered.wait()
    seen["before"] = policy()
lowered = threading.Event()
earlier = threading.Thread(target=before)
earlier.start()  # a thread the job started before lowering: lowered too
started.wait()
from convoy.batch.priority import lower_cpu_priority
applied = lower_cpu_priority(sys.argv[1])
lowered.set()
earlier.join()
later = threading.Thread(target=lambda: seen.update(after=policy()))
later.start()  # and one started after
later.join()
assert seen["before"] == seen["after"] == policy(), seen
print(applied, *policy())
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize(
    ("priority", "printed"),
    [
        ("idle", "idle True 0"),
        ("low", "low False 19"),
        ("normal", "normal False 0"),
    ],
)
def test_cpu_priority_applies_to_every_thread_of_the_job(priority: str, printed: str) -> None:
    """In a process of its own: a lowered priority cannot be raised again unprivileged."""
    done = subprocess.run(
        [sys.executable, "-c", PRIORITY_PROBE, priority],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    if priority == "idle" and done.stdout.startswith("low "):
        pytest.skip("SCHED_IDLE is refused here (a container's seccomp policy)")
    assert done.stdout.strip() == printed


def test_cpu_priority_is_idle_against_a_server_else_normal() -> None:
    parser = build_parser()
    common = ["batch", "tiny", "--input", "in.parquet", "--output", "out"]
    config = BatchConfig.from_args
    assert config(parser.parse_args(common)).cpu_priority == "normal"
    assert config(parser.parse_args([*common, "--server", "h:1"])).cpu_priority == "idle"
    explicit = [*common, "--server", "h:1", "--cpu-priority", "normal"]
    assert config(parser.parse_args(explicit)).cpu_priority == "normal"
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--cpu-priority", "realtime"])


def test_rate_spaces_requests_by_their_rows() -> None:
    """--rate R: at most R rows a second, a request waiting for its own rows' share."""
    from convoy.capture.replay_targets import Pacer

    now, slept = [0.0], []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    async def body() -> None:
        job = scorer(FakeTarget())
        job.pacer = Pacer(100.0, clock=lambda: now[0], sleep=sleep)
        for rows in (4, 2, 1):
            await job.score({"X": np.ones((rows, 1), np.float32)}, "r")

    asyncio.run(body())
    assert slept == [0.04, 0.02]  # the first goes at once; then 4 rows, 2 rows at 100/s


def test_rate_is_refused_on_ray() -> None:
    from convoy.batch.ray_engine import run_on_ray

    common = ["batch", "tiny", "--input", "in.parquet", "--output", "out", "--engine", "ray"]
    config = BatchConfig.from_args(build_parser().parse_args([*common, "--rate", "100"]))
    with pytest.raises(UsageError, match="--rate"):
        run_on_ray(config, sys.stderr)
