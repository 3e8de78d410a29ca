"""Faults and overload: every accepted request gets exactly one answer, and the
server keeps serving. Faults are injected by a convoy_python model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from loadtests import faulty_model

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e


def write_model(repo: Path, name: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(faulty_model.SOURCE)
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("faults")
    write_model(
        repo,
        "faulty",
        faulty_model.config(
            "faulty",
            "dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
            'parameters { key: "execution_timeout_ms" value { string_value: "700" } }',
        ),
    )
    write_model(
        repo,
        "slow",
        faulty_model.config(
            "slow",
            "dynamic_batching { default_queue_policy { max_queue_size: 16 } }\n"
            'parameters { key: "sleep_s" value { string_value: "0.02" } }',
            max_batch=4,
        ),
    )
    server = start_server(repo)
    yield server  # type: ignore[misc]
    server.stop()


def call(url: str, model: str, value: float, **kwargs: object) -> object:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("X", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
        return client.infer(model, [tensor], **kwargs).as_numpy("Y")[0, 0]  # type: ignore[arg-type]
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


def together(url: str, model: str, values: list[float]) -> list[object]:
    with ThreadPoolExecutor(len(values)) as pool:
        return list(pool.map(lambda v: call(url, model, v), values))


def test_backend_exception_fails_its_batch_only(fault_server: ServerProcess) -> None:
    outcomes = together(fault_server.url, "faulty", [1.0, 2.0, -1.0, 3.0])
    errors = [o for o in outcomes if isinstance(o, InferenceServerException)]
    assert errors, "the injected failure must surface"
    for e in errors:
        assert e.status() == "StatusCode.INTERNAL" and "injected failure" in e.message()
    assert call(fault_server.url, "faulty", 5.0) == 5.0


def test_out_of_memory_is_an_error_not_a_crash(fault_server: ServerProcess) -> None:
    outcome = call(fault_server.url, "faulty", -3.0)
    assert isinstance(outcome, InferenceServerException)
    assert outcome.status() == "StatusCode.INTERNAL" and "out of memory" in outcome.message()
    assert call(fault_server.url, "faulty", 6.0) == 6.0


def test_hung_backend_times_out_and_is_replaced(fault_server: ServerProcess) -> None:
    start = time.monotonic()
    outcomes = together(fault_server.url, "faulty", [-2.0, 7.0])
    elapsed = time.monotonic() - start
    assert elapsed < 10, "the execution timeout (0.7 s) must answer, not the 30 s hang"
    for outcome in outcomes:  # in the hung batch or served after it: one answer each
        if isinstance(outcome, InferenceServerException):
            assert outcome.status() == "StatusCode.UNAVAILABLE"
            assert "execution timeout" in outcome.message()
        else:
            assert outcome == 7.0
    assert any(isinstance(o, InferenceServerException) for o in outcomes)
    # The replacement instance serves.
    deadline = time.monotonic() + 30
    while (result := call(fault_server.url, "faulty", 8.0)) != 8.0:
        assert time.monotonic() < deadline, result
        time.sleep(0.2)


def test_unload_and_reload_while_requests_are_queued(fault_server: ServerProcess) -> None:
    values = [-4.0] + [float(i) for i in range(10, 22)]
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda v=v: results.append(call(fault_server.url, "faulty", v)))
        for v in values
    ]
    for t in threads:
        t.start()
    time.sleep(0.15)  # the slow batch runs; the rest queue behind it
    admin = grpcclient.InferenceServerClient(fault_server.url)
    admin.load_model("faulty")  # reload: the old version drains, the new one takes over
    for t in threads:
        t.join(60)
    assert len(results) == len(values)  # exactly one answer each
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r for r in results if not isinstance(r, Exception)) == sorted(values)
    assert admin.is_model_ready("faulty")
    admin.close()


def test_overload_is_refused_fast_and_memory_stays_flat(fault_server: ServerProcess) -> None:
    """~10x the sustainable rate: bounded queue, quick refusals, deadlines kept."""
    rss_before = _rss_mb(fault_server)
    refusals: list[float] = []
    served: list[float] = []
    other: list[object] = []
    lock = threading.Lock()

    def hammer(_: int) -> None:
        stop = time.monotonic() + 3.0
        client = grpcclient.InferenceServerClient(fault_server.url)
        tensor = grpcclient.InferInput("X", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                client.infer("slow", [tensor], timeout=2_000_000)  # 2 s, in microseconds
                with lock:
                    served.append(time.monotonic() - start)
            except InferenceServerException as exc:
                with lock:
                    if exc.status() == "StatusCode.RESOURCE_EXHAUSTED":
                        refusals.append(time.monotonic() - start)
                    else:
                        other.append(exc)
        client.close()

    with ThreadPoolExecutor(48) as pool:
        list(pool.map(hammer, range(48)))
    assert refusals, "48 callers against ~200 rows/s and a queue of 16 must be refused"
    assert served
    assert not other, other[:3]
    assert float(np.percentile(refusals, 50)) < 0.25  # refused at once, not after queueing
    assert max(served) < 2.5  # accepted requests met their 2 s deadline (plus transport)
    assert _rss_mb(fault_server) - rss_before < 200
    assert call(fault_server.url, "slow", 4.0) == 4.0


def _rss_mb(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
