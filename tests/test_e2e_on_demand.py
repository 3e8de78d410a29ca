"""`--model-control-mode on-demand` through tritonclient: models load on their first
request, within a memory budget, evicting the least recently used idle models; pinned
and in-flight models stay; `convoy cost` divides busy time between models."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT, ServerProcess, start_server
from tests.ondemand_models import metric_value, scrape, write_sized_model

MIB = 1 << 20


def x(value: float = 1.0) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("X", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return tensor


def answer(client: grpcclient.InferenceServerClient, model: str, value: float = 1.0) -> float:
    return float(client.infer(model, [x(value)]).as_numpy("Y")[0, 0])


def states(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    index = client.get_model_repository_index(as_json=True)["models"]
    return {m["name"]: (m["state"], m.get("reason", "")) for m in index}


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- a budget that holds two 40 MiB models beside the pinned one -----------------------


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("on-demand")
    repo = root / "repo"
    repo.mkdir()
    for i in range(3):
        write_sized_model(repo, f"m{i}", 40, factor=i + 1)
    write_sized_model(repo, "pinned", 10, factor=10)
    write_sized_model(repo, "slow", 40, factor=5, delay_s=4.0)
    write_sized_model(repo, "big", 90, factor=7)
    write_sized_model(repo, "huge", 105, factor=9)
    write_sized_model(repo, "bad", 5, factor=3, broken_if=root / "broken")
    (root / "broken").touch()
    server = start_server(
        repo,
        "--model-control-mode", "on-demand", "--memory-budget-mib", "110",
        "--load-model", "pinned",
    )  # fmt: skip
    yield server, root
    server.stop()


@pytest.fixture()
def client(budgeted: tuple[ServerProcess, Path]) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(budgeted[0].url)
    yield c
    c.close()


def test_every_model_is_listed_and_only_the_pinned_one_loaded(
    client: grpcclient.InferenceServerClient,
) -> None:
    found = states(client)
    assert found["pinned"] == ("READY", "")
    for name in ("m0", "m1", "m2", "slow", "big", "huge", "bad"):
        assert found[name] == ("UNAVAILABLE", "not loaded"), name


def test_concurrent_first_requests_load_the_model_once(
    budgeted: tuple[ServerProcess, Path], client: grpcclient.InferenceServerClient
) -> None:
    server = budgeted[0]
    start = threading.Barrier(8)

    def first(value: float) -> float:
        own = grpcclient.InferenceServerClient(server.url)
        try:
            start.wait()
            return answer(own, "m0", value)
        finally:
            own.close()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(first, [float(v) for v in range(8)]))
    assert answers == [float(v) for v in range(8)]  # m0: y = 1 * x
    metrics = scrape(server.metrics_port)
    assert metric_value(metrics, "convoy_model_loads_total", model="m0") == 1
    assert metric_value(metrics, "convoy_model_loads_total", model="m0", reason="first_request")
    assert metric_value(metrics, "convoy_model_waiting_requests", model="m0") == 0
    measured = metric_value(metrics, "convoy_model_memory_bytes", model="m0", device="cpu")
    assert 35 * MIB < measured < 80 * MIB
    assert states(client)["m0"] == ("READY", "")


def test_the_budget_evicts_the_least_recently_used_model(
    budgeted: tuple[ServerProcess, Path], client: grpcclient.InferenceServerClient
) -> None:
    answer(client, "m0")  # m0 loaded by the test before, or now
    assert answer(client, "m1", 2.0) == 4.0
    assert {n for n, (s, _) in states(client).items() if s == "READY"} >= {"m0", "m1", "pinned"}
    assert answer(client, "m2", 2.0) == 6.0  # 3 x 40 MiB + 10 pinned > 110: m0 goes
    found = states(client)
    assert found["m0"] == ("UNAVAILABLE", "not loaded")
    assert found["m1"][0] == found["m2"][0] == found["pinned"][0] == "READY"
    metrics = scrape(budgeted[0].metrics_port)
    assert metric_value(metrics, "convoy_model_evictions_total", model="m0", reason="memory") == 1
    assert metric_value(metrics, "convoy_model_evictions_total", model="pinned") == 0
    assert metric_value(metrics, "convoy_model_memory_bytes", model="m0") == 0  # gauge gone
    assert answer(client, "m0", 3.0) == 3.0  # back on its next request


def test_a_model_in_flight_is_never_evicted_and_what_cannot_fit_is_refused(
    budgeted: tuple[ServerProcess, Path], client: grpcclient.InferenceServerClient
) -> None:
    server = budgeted[0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(answer, grpcclient.InferenceServerClient(server.url), "slow", 2.0)
        wait_for(lambda: states(client)["slow"][0] == "READY", "slow to load")
        # Each load below needs room; the least recently used is `slow`, but it runs.
        for name, factor in (("m0", 1.0), ("m1", 2.0)):
            assert answer(client, name, 1.0) == factor
            assert not running.done()
            assert states(client)["slow"] == ("READY", "")
        # huge (105) and the pinned model (10) can never fit in 110: refused at once.
        with pytest.raises(InferenceServerException) as refused:
            client.infer("huge", [x()])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "--memory-budget-mib 110" in refused.value.message()
        assert "'huge'" in refused.value.message()
        assert not running.done()
        # big (90) fits only with slow gone too: it waits for slow's request to be
        # answered, then slow is evicted.
        assert answer(client, "big", 1.0) == 7.0
        assert running.done()
        assert running.result() == 10.0
    metrics = scrape(server.metrics_port)
    assert metric_value(metrics, "convoy_model_evictions_total", model="slow") == 1
    assert metric_value(metrics, "convoy_model_loads_total", model="huge") == 0
    assert states(client)["huge"] == ("UNAVAILABLE", "not loaded")
    assert states(client)["slow"] == ("UNAVAILABLE", "not loaded")
    assert states(client)["pinned"] == ("READY", "")
    busy = metric_value(metrics, "convoy_model_busy_seconds_total", model="slow", device="cpu")
    assert busy >= 3.5  # one 4 s batch


def test_an_unload_while_a_batch_runs_waits_for_it(
    budgeted: tuple[ServerProcess, Path], client: grpcclient.InferenceServerClient
) -> None:
    server = budgeted[0]
    evictions = metric_value(scrape(server.metrics_port), "convoy_model_evictions_total",
                             model="slow")  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(answer, grpcclient.InferenceServerClient(server.url), "slow", 3.0)
        wait_for(
            lambda: metric_value(scrape(server.metrics_port), "convoy_inflight_requests",
                                 model="slow") == 1,
            "the slow request to run",
        )  # fmt: skip
        client.unload_model("slow")
        assert running.done()  # the unload returned only once its batch was answered
        assert running.result() == 15.0
        # An explicit unload is no eviction: the count is what earlier tests left.
        assert metric_value(scrape(server.metrics_port), "convoy_model_evictions_total",
                            model="slow") == evictions  # fmt: skip
    assert states(client)["slow"][0] == "UNAVAILABLE"


def test_a_failing_load_fails_its_waiters_and_is_retried_by_the_next_request(
    budgeted: tuple[ServerProcess, Path], client: grpcclient.InferenceServerClient
) -> None:
    server, root = budgeted

    def call(_: int) -> str:
        own = grpcclient.InferenceServerClient(server.url)
        try:
            own.infer("bad", [x()])
            return "answered"
        except InferenceServerException as exc:
            return str(exc.message())
        finally:
            own.close()

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(call, range(4)))
    assert all("bad model file" in e for e in errors), errors
    time.sleep(1.0)  # no retry loop: the count stays at the loads requests asked for
    failures = metric_value(scrape(server.metrics_port), "convoy_model_load_failures_total",
                            model="bad")  # fmt: skip
    assert 1 <= failures <= 4
    assert "bad model file" in states(client)["bad"][1]
    (root / "broken").unlink()
    assert answer(client, "bad", 2.0) == 6.0
    metrics = scrape(server.metrics_port)
    assert metric_value(metrics, "convoy_model_load_failures_total", model="bad") == failures
    assert metric_value(metrics, "convoy_model_loads_total", model="bad") == 1
    assert metric_value(metrics, "convoy_model_load_seconds_count") >= 5


# -- idle eviction and cost, no budget -------------------------------------------------


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("idle")
    write_sized_model(repo, "hot", 1, factor=3, delay_s=0.02)
    write_sized_model(repo, "cold", 1, factor=1, delay_s=0.02)
    write_sized_model(repo, "kept", 1, factor=2)
    server = start_server(
        repo,
        "--model-control-mode", "on-demand", "--evict-idle-secs", "1", "--load-model", "kept",
    )  # fmt: skip
    yield server
    server.stop()


def test_idle_models_are_unloaded_and_pinned_ones_stay(idle_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(idle_server.url)
    assert answer(client, "cold") == 1.0
    wait_for(lambda: states(client)["cold"] == ("UNAVAILABLE", "not loaded"), "idle eviction")
    assert states(client)["kept"] == ("READY", "")
    metrics = scrape(idle_server.metrics_port)
    assert metric_value(metrics, "convoy_model_evictions_total", model="cold", reason="idle") == 1
    assert metric_value(metrics, "convoy_model_evictions_total", model="kept") == 0
    assert answer(client, "cold", 2.0) == 2.0  # loaded again
    client.close()


def test_convoy_cost_reports_busy_time_in_the_traffic_ratio(idle_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(idle_server.url)
    before = _cost(idle_server)
    for i in range(36):
        model = "cold" if i % 4 == 3 else "hot"  # 27 : 9
        answer(client, model)
    client.close()
    after = _cost(idle_server)

    def grown(model: str, field: str) -> float:
        return float(after[model][field] - before.get(model, {}).get(field, 0.0))

    assert grown("hot", "inferences") == 27
    assert grown("cold", "inferences") == 9
    ratio = grown("hot", "busy") / grown("cold", "busy")
    assert 2.0 < ratio < 4.5, ratio  # 3:1 within a shared machine's noise
    cost_ratio = grown("hot", "cost") / grown("cold", "cost")
    assert 2.0 < cost_ratio < 4.5, cost_ratio
    table = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "cost", "--server",
         f"127.0.0.1:{idle_server.metrics_port}", "--price", "cpu=0.10"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "totals since the server started" in table
    assert "hot" in table and "cold" in table and "$/1000" in table


def _cost(server: ServerProcess) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "cost", "--server",
         f"127.0.0.1:{server.metrics_port}", "--json", "--price", "cpu=0.10,gpu=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    body = json.loads(out)
    assert body["prices"] == {"cpu": 0.10, "gpu": 2.0}
    return {
        row["model"]: {
            "inferences": row["inferences"],
            "busy": sum(row["busy_seconds"].values()),
            "cost": row["cost"],
        }
        for row in body["models"]
    }


# -- Triton's modes beside it --------------------------------------------------------


def test_explicit_mode_loads_only_the_named_models(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_sized_model(tmp_path, name, 1)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "a")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        assert states(client) == {"a": ("READY", ""), "b": ("UNAVAILABLE", "unloaded")}
        with pytest.raises(InferenceServerException):
            client.infer("b", [x()])  # not loaded on demand in this mode
        client.load_model("b")
        assert answer(client, "b", 2.0) == 4.0
        metrics = scrape(server.metrics_port)
        assert metric_value(metrics, "convoy_model_loads_total", model="a", reason="explicit") == 1
        assert metric_value(metrics, "convoy_model_loads_total", model="b", reason="explicit") == 1
        client.close()
    finally:
        server.stop()


def test_poll_mode_counts_its_loads_as_poll(tmp_path: Path) -> None:
    write_sized_model(tmp_path, "a", 1)
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        write_sized_model(tmp_path, "late", 1, factor=4)
        wait_for(lambda: states(client).get("late", ("",))[0] == "READY", "the poll to load it")
        assert answer(client, "late") == 4.0
        metrics = scrape(server.metrics_port)
        assert metric_value(metrics, "convoy_model_loads_total", model="late", reason="poll") == 1
        assert metric_value(metrics, "convoy_model_loads_total", model="a", reason="explicit") == 1
        client.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--memory-budget-mib", "100"), "--memory-budget-mib"),
        (("--model-control-mode", "poll", "--load-model", "a"), "--load-model"),
        (
            ("--model-control-mode", "on-demand", "--repository-poll-secs", "5"),
            "--repository-poll-secs",
        ),
    ],
)
def test_flags_that_do_not_fit_the_mode_stop_the_server(
    tmp_path: Path, flags: tuple[str, ...], named: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "serve", "--model-repository", str(tmp_path),
         "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert named in done.stderr and "needs --model-control-mode" in done.stderr
