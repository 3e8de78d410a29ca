"""Replay without a server: captured rows read back in their exact shapes, the selection,
labels, the request built from a row, pacing and retries, the report's maths and gates,
and the command's usage errors."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convoy.capture.replay import (
    REPLAY_ID_PREFIX,
    CapturedRequest,
    read_labels,
    read_recent,
    read_requests,
    select,
)
from convoy.capture.replay_report import (
    Answer,
    Gates,
    Replayed,
    Tolerance,
    build_report,
    html_report,
)
from convoy.capture.replay_targets import (
    Backoff,
    Pacer,
    Refused,
    TargetModel,
    from_response,
    send,
    to_request,
)
from convoy.capture.rows import Row
from convoy.capture.writer import CaptureWriter
from convoy.cli import main
from convoy.config import CaptureConfig, read_model_config, validate_model_config
from convoy.pb import grpc_service_pb2 as pb
from convoy.tensors import float_to_bf16

from .test_capture import row_of

pa = pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")
pq = pytest.importorskip("pyarrow.parquet")

BATCHED = """
name: "m"
backend: "convoy_python"
max_batch_size: 8
input [
  { name: "X" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "VAR" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "EMAIL" data_type: TYPE_STRING dims: [ 1 ] optional: true }
]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "TAGS" data_type: TYPE_STRING dims: [ -1 ] } ]
parameters [ { key: "capture_sample_rate" value { string_value: "1" } },
             { key: "capture_hash" value { string_value: "EMAIL" } } ]
"""
UNBATCHED = """
name: "u"
backend: "convoy_python"
max_batch_size: 0
input [ { name: "IMG" data_type: TYPE_FP32 dims: [ 2, 3 ] },
        { name: "IDS" data_type: TYPE_INT32 dims: [ -1, 2 ] },
        { name: "FLAG" data_type: TYPE_BOOL dims: [ 1 ] } ]
output [ { name: "P" data_type: TYPE_FP16 dims: [ 4 ] } ]
parameters [ { key: "capture_sample_rate" value { string_value: "1" } } ]
"""
HOUR = dt.datetime(2026, 12, 7, 5, 30, tzinfo=dt.UTC)


def spec_of(tmp_path: Path, text: str) -> Any:
    name = text.split('"')[1]
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)
    return validate_model_config(read_model_config(folder), f"{name}/config.pbtxt", name)


def captured(
    spec: Any, i: int, when: dt.datetime = HOUR, **overrides: Any
) -> tuple[Any, str, Row, int]:
    """writer.put's arguments for a row of `spec`'s version 1."""
    fields: dict[str, Any] = dict(
        request_id=f"r{i}",
        timestamp_us=int(when.timestamp() * 1e6) + i,
        arm="none",
        transport="grpc",
        status="OK",
        error=None,
        queue_us=1,
        compute_us=2,
        total_us=3,
        cache_hit=False,
        client="anonymous",
        inputs={},
        outputs={},
    )
    version = overrides.pop("version", "1")
    fields.update(overrides)
    return spec, version, row_of(spec, **fields), 100


def write(tmp_path: Path, rows: list[tuple[Any, str, Row, int]]) -> str:
    uri = str(tmp_path / "capture")
    writer = CaptureWriter(CaptureConfig(uri=uri, flush_s=60))
    writer.open()
    for r in rows:
        assert writer.put(*r)
    writer.close(30)
    return uri


def batched_tensors(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = 1 + i % 3
    inputs = {
        "X": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) * (i + 0.5),
        "TEXT": np.array([[f"t{i}-{r}\x00é".encode()] for r in range(rows)], dtype=object),
        "VAR": np.arange(rows * (i + 1), dtype=np.int64).reshape(rows, i + 1) - 3,
    }
    outputs = {
        "Y": np.full((rows, 2), 2.0 * i, np.float32),
        "TAGS": np.array([[b"a", b""][: 1 + i % 2]] * rows, dtype=object),
    }
    return inputs, outputs


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        assert got[name].dtype == value.dtype, name
        assert np.array_equal(got[name], value), name


def test_rows_read_back_in_their_exact_shapes_bytes_and_variable_dims(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, BATCHED)
    rows = []
    for i in range(5):
        inputs, outputs = batched_tensors(i)
        rows.append(captured(spec, i, inputs=inputs, outputs=outputs))
    refused = captured(spec, 9, status="INVALID_ARGUMENT", error="bad", inputs={}, outputs={})
    from convoy.capture.rows import hashed as hash_of

    email = hash_of(np.array([[b"ann@example.com"]], dtype=object), b"salt")
    inputs, outputs = batched_tensors(0)
    hashed = captured(spec, 7, inputs={**inputs, "EMAIL": email}, outputs=outputs)
    uri = write(tmp_path, [*rows, refused, hashed])

    back = {r.request_id: r for r in read_requests(uri, "m")}
    assert sorted(back) == ["r0", "r1", "r2", "r3", "r4", "r7", "r9"]
    for i in range(5):
        want_in, want_out = batched_tensors(i)
        assert_same(back[f"r{i}"].inputs, want_in)
        assert_same(back[f"r{i}"].outputs, want_out)
        assert back[f"r{i}"].version == "1" and back[f"r{i}"].hashed == ()
        assert back[f"r{i}"].timestamp == HOUR + dt.timedelta(microseconds=i)
    assert back["r9"].status == "INVALID_ARGUMENT" and back["r9"].inputs == {}
    assert back["r7"].hashed == ("EMAIL",) and "EMAIL" not in back["r7"].inputs
    assert_same(back["r7"].inputs, batched_tensors(0)[0])


def test_a_model_without_a_batch_dimension_reads_back_too(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, UNBATCHED)

    def tensors(i: int) -> dict[str, Any]:
        return {
            "IMG": np.arange(6, dtype=np.float32).reshape(2, 3) + i,
            "IDS": np.arange(2 * (i + 1), dtype=np.int32).reshape(i + 1, 2),
            "FLAG": np.array([i % 2 == 0]),
        }

    out = {"P": np.array([0.5, 1.5, 2.5, 3.5], np.float16)}
    failed = captured(spec, 1, status="INTERNAL", inputs=tensors(1), outputs={})
    uri = write(
        tmp_path,
        [
            captured(spec, 0, inputs=tensors(0), outputs=out),
            failed,
            captured(spec, 2, inputs=tensors(2), outputs=out),
        ],
    )
    back = {r.request_id: r for r in read_requests(uri, "u")}
    for i in (0, 1, 2):
        assert_same(back[f"r{i}"].inputs, tensors(i))
    assert_same(back["r0"].outputs, out)
    assert back["r1"].outputs == {}  # a failed row: no answer (a null fixed-size row)
    assert_same(back["r2"].outputs, out)


def test_the_window_reads_only_its_rows_and_never_a_temporary_file(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, BATCHED)
    inputs, outputs = batched_tensors(0)
    times = [HOUR - dt.timedelta(hours=2), HOUR, HOUR + dt.timedelta(minutes=10)]
    uri = write(
        tmp_path,
        [captured(spec, i, t, inputs=inputs, outputs=outputs) for i, t in enumerate(times)],
    )
    (written,) = Path(uri, "requests", "model=m", "version=1", "date=2026-12-07", "hour=05").glob(
        "*.parquet"
    )
    (written.parent / ".partial.parquet.tmp").write_bytes(b"half a file")
    (written.parent / ".other.parquet").write_bytes(b"hidden")
    since, until = HOUR - dt.timedelta(minutes=1), HOUR + dt.timedelta(minutes=5)
    assert [r.request_id for r in read_requests(uri, "m", since, until)] == ["r1"]
    assert [r.request_id for r in read_requests(uri, "m", since)] == ["r1", "r2"]
    assert [r.request_id for r in read_requests(uri, "m")] == ["r0", "r1", "r2"]
    assert read_requests(uri, "other") == []


def test_the_newest_k_replayable_rows_are_read_without_converting_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_requests bounds what becomes numpy: the hours are walked newest first, rows
    that cannot be replayed are left out on their Arrow columns, and older hours unread."""
    import convoy.capture.replay as replay_module

    spec = spec_of(tmp_path, BATCHED)
    inputs, outputs = batched_tensors(0)
    rows = []
    for h in range(6):  # 6 hours of 20 rows each: the newest hour ends in 5 refused rows
        for j in range(20):
            i = h * 20 + j
            when = HOUR - dt.timedelta(hours=5 - h) + dt.timedelta(seconds=j)
            extra: dict[str, Any] = {}
            if h == 5 and j >= 15:
                extra = dict(status="UNAVAILABLE", error="x", inputs={}, outputs={})
            elif h == 5 and j == 14:
                extra = dict(transport="replay", request_id=f"{REPLAY_ID_PREFIX}r{i}")
            elif h == 5 and j == 13:
                extra = dict(arm="shadow")
            rows.append(captured(spec, i, when, **{"inputs": inputs, "outputs": outputs, **extra}))
    uri = write(tmp_path, rows)
    converted: list[int] = []
    real = replay_module._rows_of

    def counting(table: Any, version: str) -> list[CapturedRequest]:
        converted.append(table.num_rows)
        return real(table, version)

    monkeypatch.setattr(replay_module, "_rows_of", counting)
    got, skipped = read_recent(uri, "m", max_requests=25)
    # The 25 most recent replayable: hour 5's first 13, hour 4's last 12; oldest first.
    assert [r.request_id for r in got] == [f"r{i}" for i in range(88, 100)] + [
        f"r{i}" for i in range(100, 113)
    ]
    assert skipped == {"not_ok": 5, "replay": 1, "shadow": 1}
    assert sum(converted) == 25  # hours 0 to 3 never read into numpy
    # The same selection as reading everything and selecting.
    everything = select(read_requests(uri, "m"), max_requests=25)
    assert [r.request_id for r in everything.requests] == [r.request_id for r in got]
    got_all, skipped_all = read_recent(uri, "m")
    assert len(got_all) == 113 and skipped_all == skipped


def test_a_corrupt_or_foreign_parquet_file_is_a_read_error_naming_the_capture_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_of(tmp_path, BATCHED)
    inputs, outputs = batched_tensors(0)
    uri = write(tmp_path, [captured(spec, 0, inputs=inputs, outputs=outputs)])
    folder = Path(uri, "requests", "model=m", "version=1", "date=2026-12-07", "hour=05")
    (folder / "corrupt.parquet").write_bytes(b"PAR1 not really")
    code = main(["replay", "m", "--capture-dir", uri, "--candidate", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--capture-dir" in err and "corrupt.parquet" in err and "Traceback" not in err
    (folder / "corrupt.parquet").unlink()
    pq.write_table(pa.table({"a": [1]}), folder / "foreign.parquet")
    code = main(
        ["replay", "m", "--capture-dir", uri, "--candidate", "2", "--since", "2026-12-07T00:00"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--capture-dir" in err and "foreign.parquet" in err


def request_row(i: int, **overrides: Any) -> CapturedRequest:
    fields: dict[str, Any] = dict(
        request_id=f"r{i}",
        version="1",
        timestamp=HOUR + dt.timedelta(seconds=i),
        arm="none",
        transport="grpc",
        status="OK",
        inputs={"X": np.full((1, 1), float(i), np.float32)},
        outputs={"Y": np.full((1, 1), 2.0 * i, np.float32)},
    )
    fields.update(overrides)
    return CapturedRequest(**fields)


def test_selection_replays_callers_answered_requests_the_most_recent_first_kept() -> None:
    rows = [
        request_row(0),
        request_row(1, arm="shadow"),
        request_row(2, request_id=REPLAY_ID_PREFIX + "r0"),
        request_row(3, status="RESOURCE_EXHAUSTED"),
        request_row(4, hashed=("EMAIL",)),
        request_row(5, inputs={}),
        request_row(6),
        request_row(7),
    ]
    chosen = select(rows, required={"X"}, max_requests=2)
    assert [r.request_id for r in chosen.requests] == ["r6", "r7"]
    assert chosen.skipped == {
        "shadow": 1,
        "replay": 1,
        "not_ok": 1,
        "hashed_inputs": 1,
        "missing_inputs": 1,
        "over_max_requests": 1,
    }


def test_labels_are_the_latest_per_request_and_absent_without_a_folder(tmp_path: Path) -> None:
    uri = str(tmp_path / "capture")
    assert read_labels(uri, "m") is None
    folder = tmp_path / "capture" / "labels" / "model=m" / "date=2026-12-07"
    folder.mkdir(parents=True)
    stamp = pa.timestamp("us", tz="UTC")
    for name, ids, labels, times in (
        ("a", ["r1", "r2"], [3, 4], [HOUR, HOUR]),
        ("b", ["r1"], [5], [HOUR + dt.timedelta(minutes=1)]),
        ("c", ["r2"], [9], [HOUR - dt.timedelta(minutes=1)]),  # older: not the label
    ):
        table = pa.table({"request_id": ids, "label": labels, "timestamp": pa.array(times, stamp)})
        pq.write_table(table, folder / f"{name}.parquet")
    assert read_labels(uri, "m") == {"r1": 5, "r2": 4}
    # As the Feedback RPC writes them: text, with the kind it was sent as.
    later = pa.array([HOUR + dt.timedelta(hours=1)] * 3, stamp)
    table = pa.table(
        {
            "request_id": ["r3", "r4", "r5"],
            "label": ["2", "0.1", "cat"],
            "kind": ["class_index", "value", "class_label"],
            "value": pa.array([2.0, 0.1, None], pa.float64()),
            "version": ["1", "1", "1"],
            "timestamp": later,
        }
    )
    pq.write_table(table, folder / "feedback.parquet")
    assert read_labels(uri, "m") == {"r1": 5, "r2": 4, "r3": 2, "r4": 0.1, "r5": "cat"}


def test_a_request_carries_the_captured_inputs_exactly_and_answers_decode() -> None:
    row = request_row(
        0,
        inputs={
            "X": np.arange(6, dtype=np.float32).reshape(3, 2),
            "TEXT": np.array([[b"a\x00b"], [b""], [b"xyz"]], dtype=object),
            "H": float_to_bf16(np.array([[1.5], [2.0], [-3.0]], np.float32)),
        },
    )
    model = TargetModel(
        "m", "3", {"X": "FP32", "TEXT": "BYTES", "H": "BF16"}, frozenset({"X"}), {"Y": "FP32"}, True
    )
    request = to_request(row, model)
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "replay:r0")
    assert request.parameters["background"].bool_param is True
    assert request.parameters["response_cache"].bool_param is False
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("X", "FP32", [3, 2]),
        ("TEXT", "BYTES", [3, 1]),
        ("H", "BF16", [3, 1]),
    ]
    # The request's inputs, read as a response's outputs, are the captured tensors.
    echoed = pb.ModelInferResponse()
    for tensor in request.inputs:
        echoed.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    echoed.raw_output_contents.extend(request.raw_input_contents)
    back = from_response(echoed)
    assert np.array_equal(back["X"], row.inputs["X"])
    assert back["TEXT"].tolist() == [[b"a\x00b"], [b""], [b"xyz"]]
    assert back["H"].dtype == np.float32 and back["H"].ravel().tolist() == [1.5, 2.0, -3.0]


def test_the_pacer_spaces_requests_at_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def run() -> None:
        pacer = Pacer(4.0, clock=lambda: now[0], sleep=sleep)
        for _ in range(5):
            await pacer.wait()

    asyncio.run(run())
    assert slept == [0.25, 0.25, 0.25, 0.25] and now[0] == 1.0


class FlakyTarget:
    """Sheds the first `shed` tries, then echoes the request's inputs as outputs."""

    def __init__(self, shed: int, code: str = "RESOURCE_EXHAUSTED") -> None:
        self.shed = shed
        self.code = code
        self.tries = 0

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self.tries += 1
        if self.tries <= self.shed:
            raise Refused(self.code, "queue full")
        response = pb.ModelInferResponse()
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response


def test_a_shed_request_is_tried_again_with_back_off_until_it_gives_up() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    model = TargetModel("m", "1", {"X": "FP32"}, frozenset({"X"}), {"X": "FP32"}, True)
    request = to_request(request_row(1), model)
    backoff = Backoff(attempts=4, first_s=0.1, most_s=0.3)
    target = FlakyTarget(shed=2)
    answer = asyncio.run(send(target, request, Pacer(None), backoff, sleep))  # type: ignore[arg-type]
    assert answer.ok and answer.outputs is not None and answer.outputs["X"].tolist() == [[1.0]]
    assert target.tries == 3 and slept == [0.1, 0.2]
    slept.clear()
    gone = FlakyTarget(shed=10, code="UNAVAILABLE")
    answer = asyncio.run(send(gone, request, Pacer(None), backoff, sleep))  # type: ignore[arg-type]
    assert not answer.ok and answer.error == "UNAVAILABLE: queue full"
    assert gone.tries == 4 and slept == [0.1, 0.2, 0.3]
    wrong = FlakyTarget(shed=10, code="INVALID_ARGUMENT")
    answer = asyncio.run(send(wrong, request, Pacer(None), backoff, sleep))  # type: ignore[arg-type]
    assert not answer.ok and wrong.tries == 1  # not the server's load: the version's answer


def ok(y: Any, latency_s: float = 0.001) -> Answer:
    return Answer({"Y": np.asarray(y, np.float32)}, None, latency_s)


def test_diff_rate_noise_floor_and_divergence() -> None:
    replayed = [
        # identical, and identical to what was captured
        Replayed(
            request_row(0, outputs={"Y": np.array([[0.0]], np.float32)}), ok([[0.0]]), ok([[0.0]])
        ),
        # the candidate within tolerance; the baseline drifted from its capture
        Replayed(
            request_row(1, outputs={"Y": np.array([[1.0]], np.float32)}),
            ok([[2.0 + 1e-7]]),
            ok([[2.0]]),
        ),
        # beyond tolerance by 0.5
        Replayed(
            request_row(2, outputs={"Y": np.array([[4.0]], np.float32)}), ok([[4.5]]), ok([[4.0]])
        ),
        # the candidate failed
        Replayed(request_row(3), Answer(None, "INTERNAL: boom"), ok([[6.0]])),
        # served by another version: not re-scored for the noise floor
        Replayed(request_row(4, version="7"), ok([[8.0]]), ok([[8.0]])),
        # the baseline failed: nothing to compare with
        Replayed(request_row(5), ok([[10.0]]), Answer(None, "INTERNAL: boom")),
    ]
    report = build_report(
        "m", "2", "1", replayed, tolerance=Tolerance(1e-5, 1e-6), gates=Gates(max_diff_rate=0.5)
    )
    assert report.requests == 6 and report.compared == 5
    assert report.diff_rate == pytest.approx(2 / 5)  # row 2, and row 3's failure
    assert report.noise_compared == 5 and report.noise_floor == pytest.approx(2 / 5)
    assert report.errors == {"2": 1, "1": 1}
    assert report.error_samples == {"2": ["INTERNAL: boom"], "1": ["INTERNAL: boom"]}
    y = report.divergence["Y"]
    assert y.compared == 4 and y.differing == 1
    assert y.max_abs == pytest.approx(0.5)
    assert y.as_json()["mean_abs"] == pytest.approx((1e-7 + 0.5) / 4, rel=1e-3)
    assert y.as_json()["top1_change"] is None  # one value per row: not a classifier
    assert report.latency_ms["2"] == {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0}
    # 0.4 is within 0.4 + 0.5; the candidate's failure, 1 of 5, is within 0.5 too.
    assert report.passed
    assert report.reasons == ["accuracy: no labels folder in the capture directory; gate skipped"]


def test_a_difference_beyond_the_noise_floor_fails_and_says_why() -> None:
    same = [Replayed(request_row(i), ok([[2.0 * i]]), ok([[2.0 * i]])) for i in range(10)]
    worse = [Replayed(request_row(i), ok([[3.0 * i + 1]]), ok([[2.0 * i]])) for i in range(10)]
    assert build_report("m", "3", "1", same).passed
    report = build_report("m", "2", "1", worse)
    assert not report.passed and report.diff_rate == 1.0 and report.noise_floor == 0.0
    assert report.reasons[0].startswith("diff_rate 1.0000 exceeds the noise floor 0.0000")
    # A noisy baseline raises the floor: the same difference is then normal.
    noisy = [
        Replayed(
            request_row(i, outputs={"Y": np.array([[99.0]], np.float32)}),
            ok([[3.0 * i + 1]]),
            ok([[2.0 * i]]),
        )
        for i in range(10)
    ]
    assert build_report("m", "2", "1", noisy).noise_floor == 1.0
    assert build_report("m", "2", "1", noisy).passed
    failing = [Replayed(request_row(i), Answer(None, "x"), ok([[1.0]])) for i in range(10)]
    report = build_report("m", "2", "1", failing)
    assert any("the candidate failed 10 of 10" in r for r in report.reasons)
    nothing = build_report("m", "2", "1", [Replayed(request_row(0), ok([[1]]), Answer(None, "x"))])
    assert not nothing.passed and nothing.reasons[0].startswith("nothing compared")


def test_top1_change_and_accuracy_of_a_classifier_on_labelled_requests() -> None:
    def scores(*classes: int) -> Any:
        out = np.zeros((len(classes), 3), np.float32)
        out[np.arange(len(classes)), classes] = 1.0
        return out

    rows = [
        request_row(i, inputs={"X": np.zeros((2, 1), np.float32)}, outputs={}) for i in range(4)
    ]
    replayed = [
        Replayed(rows[0], ok(scores(0, 1)), ok(scores(0, 1))),
        Replayed(rows[1], ok(scores(2, 2)), ok(scores(1, 2))),
        Replayed(rows[2], ok(scores(0, 0)), ok(scores(0, 0))),
        Replayed(rows[3], ok(scores(1, 1)), ok(scores(1, 1))),  # no label
    ]
    labels = {"r0": [0, 1], "r1": ["cat", "dog"], "r2": 0}  # per row, by name, one for all
    report = build_report(
        "m",
        "2",
        "1",
        replayed,
        labels=labels,
        class_names=["ant", "cat", "dog"],
        gates=Gates(max_diff_rate=1.0, max_accuracy_drop=0.1),
    )
    assert report.divergence["Y"].as_json()["top1_change"] == pytest.approx(1 / 8)
    assert report.labelled == 6
    assert report.accuracy == {"2": pytest.approx(5 / 6), "1": 1.0}
    assert not report.passed
    assert report.reasons[0] == (
        "accuracy 0.8333 is 0.1667 below the baseline's 1.0000 (max_accuracy_drop 0.1)"
    )
    assert report.reasons[1].startswith("noise_floor: no captured answer of version 1")
    unlabelled = build_report("m", "2", "1", replayed, labels={"other": 1})
    assert unlabelled.accuracy == {"2": None, "1": None}
    assert "none of the replayed requests has a label" in unlabelled.reasons[-1]
    # With no class names to read the answers by (a --server), the labels given as names
    # are left out, and said so, rather than judged wrong for every version.
    unnamed = build_report("m", "2", "1", replayed, labels=labels)
    assert unnamed.labelled == 4 and unnamed.accuracy == {"2": 1.0, "1": 1.0}
    assert "accuracy: 2 labelled rows give a class name" in " ".join(unnamed.reasons)
    only_names = build_report("m", "2", "1", replayed, labels={"r1": ["cat", "dog"]})
    assert only_names.accuracy == {"2": None, "1": None} and only_names.labelled == 0


def test_the_json_and_html_reports_stand_alone() -> None:
    rows = [request_row(i, outputs={}) for i in range(2)]
    replayed = [
        Replayed(rows[0], ok([[1.0, 2.0]]), Answer(None, "x")),
        Replayed(rows[1], Answer({"Y": np.zeros(3, np.float32)}), ok([[1.0, 2.0]])),
    ]
    document = build_report("m<script>", "2", "1", replayed).as_json()
    json.dumps(document, allow_nan=False)  # a shape mismatch's infinity is "inf"
    assert document["divergence"]["Y"]["max_abs"] == "inf"
    for key in (
        "model",
        "candidate",
        "baseline",
        "requests",
        "errors",
        "latency_ms",
        "diff_rate",
        "noise_floor",
        "divergence",
        "accuracy",
        "passed",
        "reasons",
    ):
        assert key in document
    page = html_report(document)
    assert page.startswith("<!doctype html>") and "FAILED" in page
    assert "<script>" not in page and "src=" not in page and "href=" not in page


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--candidate", "2"], "--capture-dir"),
        (["--capture-dir", "X"], "--candidate"),
        (["--capture-dir", "X", "--candidate", "2", "--since", "yesterday"], "--since"),
        (["--capture-dir", "X", "--candidate", "2", "--rate", "0"], "--rate"),
        (["--capture-dir", "X", "--candidate", "2", "--max-diff-rate", "-1"], "--max-diff-rate"),
        (
            [
                "--capture-dir",
                "X",
                "--candidate",
                "2",
                "--server",
                "h:1",
                "--model-repository",
                "d",
            ],
            "--model-repository",
        ),
        (["--capture-dir", "X", "--candidate", "2", "--baseline", "2"], "--baseline"),
        (["--capture-dir", "X", "--candidate", "2", "--since", "1h", "--until", "2h"], "--since"),
        (["--capture-dir", "{dir}", "--candidate", "2"], "--capture-dir"),  # nothing captured
        (["--capture-dir", "X", "--candidate", "2", "--server", "http://h:8000"], "--server"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    try:
        code = main(["replay", "m", *argv])
    except SystemExit as exit_:  # argparse's own usage errors
        code = int(exit_.code or 0)
    assert code == 2
    assert flag in capsys.readouterr().err


def test_server_takes_host_port_or_a_grpc_url() -> None:
    from convoy.arguments import grpc_address

    assert grpc_address("127.0.0.1:8001") == "127.0.0.1:8001"
    assert grpc_address("grpc://triton.internal:8001/") == "triton.internal:8001"
    assert grpc_address("dns:///triton.internal:8001") == "dns:///triton.internal:8001"
    for bad in ("http://h:8000", "grpc://", "grpc://h:8001/v2/models"):
        with pytest.raises(argparse.ArgumentTypeError, match="host:port or grpc://host:port"):
            grpc_address(bad)


def test_over_a_noise_floor_only_a_significant_excess_fails() -> None:
    """A nondeterministic model's floor is a sample: 12 of 12 against 11 of 12 is chance,
    45 of 50 against 5 of 50 is not."""

    def run(differing: int, noisy: int, n: int) -> Any:
        replayed = [
            Replayed(
                request_row(i, outputs={"Y": np.array([[1.0 if i < noisy else 0.0]], np.float32)}),
                ok([[1.0 if i < differing else 0.0]]),
                ok([[0.0]]),
            )
            for i in range(n)
        ]
        return build_report("m", "2", "1", replayed)

    chance = run(12, 11, 12)
    assert chance.diff_rate == 1.0 and chance.noise_floor == pytest.approx(11 / 12)
    assert chance.passed and chance.diff_p_value == pytest.approx(0.5)
    real = run(45, 5, 50)
    assert not real.passed and real.diff_p_value is not None and real.diff_p_value < 1e-10
    assert "one-sided Fisher exact p" in real.reasons[0]
    assert run(2, 0, 100).diff_p_value is None and not run(2, 0, 100).passed  # exact


LIN = """
name: "lin"
backend: "convoy_python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
version_policy: { all { } }
parameters [ { key: "capture_sample_rate" value { string_value: "1" } } ]
"""


def test_a_candidate_that_fails_to_load_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_of(tmp_path, LIN)
    model = tmp_path / "models" / "lin"
    for version, source in ((1, "return {'Y': i['X'] * 2}"), (2, "raise ValueError('no')")):
        (model / str(version)).mkdir()
        (model / str(version) / "model.py").write_text(
            f"class Model:\n    def __init__(self, c):\n        pass\n\n"
            f"    def __call__(self, i):\n        {source}\n"
        )
    (model / "3").mkdir()
    (model / "3" / "model.py").write_text("raise ImportError('broken on purpose')\n")
    x = np.ones((1, 1), np.float32)
    uri = write(
        tmp_path, [captured(spec, i, inputs={"X": x}, outputs={"Y": 2 * x}) for i in range(3)]
    )
    report = tmp_path / "report.json"
    argv = ["replay", "lin", "--capture-dir", uri, "--model-repository", str(tmp_path / "models")]
    assert main([*argv, "--candidate", "3", "--report", str(report)]) == 1
    document = json.loads(report.read_text())
    assert document["requests"] == 0 and not document["passed"]
    assert document["reasons"][0].startswith("version 3 of 'lin' failed to load")
    # A candidate that loads but fails every request: its errors fail the gate.
    assert main([*argv, "--candidate", "2", "--report", str(report)]) == 1
    document = json.loads(report.read_text())
    assert document["errors"] == {"2": 3, "1": 0} and document["diff_rate"] == 1.0
    assert any("the candidate failed 3 of 3" in r for r in document["reasons"])
    assert "FAILED" in capsys.readouterr().out
