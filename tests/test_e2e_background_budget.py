"""The background loop budget through the real server and the batch job's own client
(issue 27): background requests run at full speed alone, are paced while callers are
about, each get exactly one answer (served, or UNAVAILABLE when the server drains), and a
`convoy batch --server` job beside callers still scores every row.

Bounds are loose on purpose: the machines are shared and noisy. What is asserted is the
difference between tens and hundreds of requests, not a rate.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.batch.engine import ModelSignature, to_request
from convoy.capture.replay_targets import Refused, ServerTarget
from convoy.config import TensorSpec

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

TINY = ModelSignature(
    name="tiny",
    version="",
    inputs=(TensorSpec("INPUT0", "FP32", (16,)),),
    outputs=(TensorSpec("OUTPUT0", "FP32", (16,)),),
    max_batch_size=256,
    instances=1,
)
ROWS = np.ones((8, 16), np.float32)


@contextmanager
def callers_about(server: ServerProcess, every_s: float = 0.05) -> Iterator[list[int]]:
    """An online caller every `every_s` (tritonclient, no `background`), until the block ends."""
    stop = threading.Event()
    served = [0]

    def call() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        try:
            while not stop.wait(every_s):
                try:
                    client.infer("tiny", [tensor], client_timeout=30)
                except InferenceServerException:  # the server drains: keep calling
                    continue
                served[0] += 1
        finally:
            client.close()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    try:
        while not served[0]:  # the server has seen a caller: they are about
            stop.wait(0.01)
        yield served
    finally:
        stop.set()
        thread.join(30)


async def background_answers(
    target: ServerTarget, seconds: float, concurrency: int = 4
) -> tuple[int, int]:
    """Background requests sent back to back for `seconds`: (answered within the window,
    answered in all). Every request sent is awaited to its answer."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    within, answered = [0], [0]

    async def worker(n: int) -> None:
        while loop.time() < end:
            reply = await target.infer(to_request(TINY, {"INPUT0": ROWS}, f"w{n}"))
            assert reply.outputs[0].name == "OUTPUT0"
            answered[0] += 1
            within[0] += loop.time() <= end

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return within[0], answered[0]


def scrape(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Path:
    return make_repository(tmp_path_factory.mktemp("budget-repo"), examples_dir, ("tiny",))


def test_background_work_is_paced_only_while_callers_are_about(repository: Path) -> None:
    # 0.2% of the loop at ~0.3 ms a request: about 7 requests a second beside callers.
    server = start_server(repository, "--background-loop-share", "0.002")
    try:

        async def measure() -> tuple[tuple[int, int], tuple[int, int]]:
            target = ServerTarget(server.url, "tiny")
            try:
                alone = await background_answers(target, 2.0)
                with callers_about(server):
                    beside = await background_answers(target, 2.0)
                return alone, beside
            finally:
                await target.close()

        (alone, _), (beside, answered) = asyncio.run(measure())
        assert alone >= 100, (alone, beside)  # hundreds to thousands on a quiet machine
        assert beside <= 40, (alone, beside)  # ~7/s plus a 2 ms burst: ~20
        assert answered >= beside  # every request sent was answered, none lost
        assert scrape(server, "convoy_background_budget_waits_total") > 0
        assert scrape(server, "convoy_background_budget_wait_seconds_total") > 0.5
    finally:
        assert server.stop() == 0, server.output()


def test_waiting_background_requests_are_answered_when_the_server_drains(
    repository: Path,
) -> None:
    server = start_server(repository, "--background-loop-share", "0.0005", "--grace-period", "10")
    outcomes: list[str] = []

    async def wait_then_drain() -> None:
        target = ServerTarget(server.url, "tiny")

        async def one(n: int) -> None:
            try:
                await target.infer(to_request(TINY, {"INPUT0": ROWS}, f"d{n}"))
                outcomes.append("OK")
            except Refused as refused:
                outcomes.append(refused.code)

        try:
            with callers_about(server):
                sent = [asyncio.ensure_future(one(n)) for n in range(12)]
                await asyncio.sleep(1.0)  # a burst's worth served, the rest waiting
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(asyncio.gather(*sent), 30)
        finally:
            await target.close()

    try:
        asyncio.run(wait_then_drain())
        assert server.proc.wait(60) == 0, server.output()
    finally:
        server.stop()
    assert len(outcomes) == 12  # each answered once
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes  # never CANCELLED
    assert "UNAVAILABLE" in outcomes, outcomes  # the waiting ones were refused, not run


def test_a_batch_job_beside_callers_scores_every_row(repository: Path, tmp_path: Path) -> None:
    """The job's client (60 s a request, no retry of DEADLINE_EXCEEDED) waits out the
    server's pacing at the default share."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from convoy.batch.cli import run_batch
    from convoy.cli import build_parser

    rows = 400
    x = np.random.default_rng(3).standard_normal((rows, 16)).astype(np.float32)
    table = pa.table({"INPUT0": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16)})
    pq.write_table(table, tmp_path / "in.parquet")
    server = start_server(repository)
    try:
        with callers_about(server):
            out = io.StringIO()
            argv = ["batch", "tiny", "--input", str(tmp_path / "in.parquet"), "--output",
                    str(tmp_path / "out"), "--server", server.url, "--batch-size", "2"]  # fmt: skip
            code = run_batch(build_parser().parse_args(argv), out, io.StringIO())
        summary = json.loads(out.getvalue().strip().splitlines()[-1])
        assert code == 0 and summary["rows"] == rows, summary
        assert scrape(server, "convoy_background_budget_waits_total") > 0  # it was paced
    finally:
        assert server.stop() == 0, server.output()
