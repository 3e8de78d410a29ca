"""`convoy serve --frontends 2`: two front-end processes on one port feeding one engine,
through the stock tritonclient."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.pb import grpc_service_pb2 as pb

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e


def _sleeper(seconds: float) -> str:
    """A convoy_python model's source: Y = 2X, after `seconds` a batch."""
    return f"""
import time
class Model:
    def __init__(self, config):
        pass
    def __call__(self, inputs):
        time.sleep({seconds})
        return {{"Y": inputs["X"] * 2}}
"""


SLOW = _sleeper(0.05)


BIG = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        return {"Y": x * 2, "S": x.sum(axis=1, keepdims=True)}
"""


def _python_model(root: Path, name: str, source: str, max_batch_size: int, rest: str) -> None:
    """A convoy_python model: its model.py and a config.pbtxt of `rest` (the tensors
    and whatever else) after name, backend and max_batch_size."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(source)
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "convoy_python"\nmax_batch_size: {max_batch_size}\n{rest}'
    )


@pytest.fixture()
def repo(tmp_path: Path, examples_dir: Path) -> Path:
    root = make_repository(tmp_path / "repo", examples_dir, ("tiny",))
    _python_model(
        root, "slow", SLOW, 16,
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 20000 }\n",
    )  # fmt: skip
    _python_model(
        root, "big", BIG, 4,
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 65536 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 65536 ] },'
        ' { name: "S" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n",
    )  # fmt: skip
    return root


def _frontend_pids(server: ServerProcess) -> list[int]:
    """The engine's spawned children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    pids = []
    for pid in (int(p) for p in children.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


# A connection of each client's own: gRPC otherwise shares one between channels to the
# same address (its global subchannel pool), and one connection reaches one front end.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _call(url: str, value: float) -> float | InferenceServerException:
    client = grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
    try:
        tensor = grpcclient.InferInput("X", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
        return float(client.infer("slow", [tensor]).as_numpy("Y")[0, 0])
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


@pytest.fixture()
def served(repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(repo, "--frontends", "2")
    yield proc
    proc.stop()


def test_answers_batches_and_every_rpc_through_two_front_ends(served: ServerProcess) -> None:
    assert len(_frontend_pids(served)) == 2
    client = grpcclient.InferenceServerClient(served.url)
    assert client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny", as_json=True)["name"] == "tiny"
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    tensor = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("tiny", [tensor]).as_numpy("OUTPUT0"), 2 * x + 1)
    with pytest.raises(InferenceServerException) as info:  # errors keep their status
        client.infer("nosuch", [tensor])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    # Bytes that are no ModelInferRequest: a clear INVALID_ARGUMENT, and serving goes on.
    with grpc.insecure_channel(served.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as raw_info:
            infer(b"\xff\xff\xff\x0f", timeout=10)
        assert raw_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInferRequest" in (raw_info.value.details() or "")
    # Many connections (spread over both front ends by the kernel): batches still form
    # across all of them in the engine's one queue.
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda v: _call(served.url, v), [float(i) for i in range(48)]))
    assert results == [2.0 * i for i in range(48)]
    stats = client.get_inference_statistics("slow", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 48 and int(stats["execution_count"]) < 48
    client.close()
    # Every ModelInfer above (1 + 1 + 1 + 48) counted under the front end that passed it
    # on, both of which carried some; each front end's own CPU and memory beside.
    scraped = _metrics(served)
    passed = {k: v for k, v in scraped.items() if k.startswith("convoy_frontend_requests_total")}
    assert sum(passed.values()) == 51, passed
    assert set(passed) == {f'convoy_frontend_requests_total{{frontend="{i}"}}' for i in (0, 1)}
    for i in (0, 1):
        assert scraped[f'convoy_frontend_cpu_seconds_total{{frontend="{i}"}}'] > 0
        assert scraped[f'convoy_frontend_resident_memory_bytes{{frontend="{i}"}}'] > 20 << 20
    # Each front end's own garbage-collection pauses, reported to the engine: at least
    # the full collection that froze its heap after start-up.
    full = [
        f'convoy_frontend_gc_pause_seconds_count{{frontend="{i}",generation="2"}}' for i in (0, 1)
    ]
    deadline = time.monotonic() + 10  # a front end reports every 2 s
    while any(scraped.get(k, 0) < 1 for k in full) and time.monotonic() < deadline:
        time.sleep(0.5)
        scraped = _metrics(served)
    assert all(scraped.get(k, 0) >= 1 for k in full), {k: scraped.get(k) for k in full}


def _big_call(url: str, seed: int) -> None:
    """One call of the "big" model with 1-4 rows of 256 KiB; the answers checked."""
    rows = 1 + seed % 4
    x = np.random.default_rng(seed).standard_normal((rows, 65536)).astype(np.float32)
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput("S"), grpcclient.InferRequestedOutput("Y")]
    result = client.infer("big", [tensor], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("Y"), 2 * x)
    np.testing.assert_allclose(result.as_numpy("S"), x.sum(axis=1, keepdims=True), rtol=1e-5)
    client.close()


def test_large_tensors_go_through_the_front_ends_shared_memory(served: ServerProcess) -> None:
    """256 KiB inputs and outputs travel through each front end's segment (the engine
    maps both, their names already unlinked); 96 calls of up to 1 MiB each, 6x what
    one ring holds at once, so slots are freed and reused; every answer exact."""
    maps = Path(f"/proc/{served.proc.pid}/maps").read_text()
    assert maps.count("/dev/shm/convoy-frontend-") >= 2 and "(deleted)" in maps

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(functools.partial(_big_call, served.url), range(96)))
    # A request that names the client's own shared memory still reaches the engine
    # unchanged through a front end, and small answers come inline.
    assert _call(served.url, 5.0) == 10.0
    # A large request with too few bytes: the error names what the client sent, not the
    # front end's shared memory it travelled through.
    request = pb.ModelInferRequest(model_name="big")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 65536])
    request.raw_input_contents.append(bytes(65536 * 4 - 4))
    with grpc.insecure_channel(served.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(request.SerializeToString(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents[0] holds 262140 bytes" in (info.value.details() or ""), (
        info.value.details()
    )
    assert not list(Path("/dev/shm").glob(f"convoy-frontend-{served.proc.pid}-*"))
    scraped = _metrics(served)
    assert scraped['convoy_frontend_tensor_bytes_total{direction="input",path="shared_memory"}'] > (
        96 * 65536 * 4
    )
    assert scraped[
        'convoy_frontend_tensor_bytes_total{direction="output",path="shared_memory"}'
    ] > (96 * 65536 * 4)
    assert scraped["convoy_frontend_shared_memory_segments"] == 2
    assert scraped["convoy_frontends"] == 2


def _metrics(server: ServerProcess) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as answer:
        text = answer.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_large_tensors_travel_inline_without_shared_memory(repo: Path) -> None:
    """With no segment (--frontend-shm-mib 0) 256 KiB-1 MiB requests and answers travel
    inside the ZeroMQ messages, each large body a frame of its own: every answer exact,
    also when several share a message."""
    server = start_server(repo, "--frontends", "2", "--frontend-shm-mib", "0")
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(functools.partial(_big_call, server.url), range(32)))
        assert _call(server.url, 5.0) == 10.0  # small ones alongside
        scraped = _metrics(server)
        assert scraped["convoy_frontend_shared_memory_segments"] == 0
        assert scraped['convoy_frontend_tensor_bytes_total{direction="input",path="inline"}'] > (
            32 * 65536 * 4
        )
    finally:
        server.stop()


def test_a_client_output_region_with_a_large_inline_input(served: ServerProcess) -> None:
    """A 256 KiB inline input (a front end would move it to its segment) with the
    output asked for in the client's own region: the answer is written there."""
    import tritonclient.utils.shared_memory as shm

    x = np.random.default_rng(1).standard_normal((1, 65536)).astype(np.float32)
    client = grpcclient.InferenceServerClient(served.url)
    handle = shm.create_shared_memory_region("fe_out", "/convoy_test_fe_out", x.nbytes)
    try:
        client.register_system_shared_memory("fe_out", "/convoy_test_fe_out", x.nbytes)
        tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput("Y")
        out.set_shared_memory("fe_out", x.nbytes)
        client.infer("big", [tensor], outputs=[out])
        got = shm.get_contents_as_numpy(handle, np.float32, list(x.shape))
        np.testing.assert_array_equal(got, 2 * x)
        client.unregister_system_shared_memory("fe_out")
    finally:
        shm.destroy_shared_memory_region(handle)
        client.close()


def test_a_killed_front_end_is_restarted_and_only_its_calls_fail(served: ServerProcess) -> None:
    victim, survivor = _frontend_pids(served)
    # (caller, when it was answered, the answer)
    outcomes: list[tuple[int, float, float | InferenceServerException]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller(seed: int) -> None:
        i = seed
        while not stop.is_set():
            result = _call(served.url, float(i % 100))
            with lock:
                outcomes.append((seed, time.monotonic(), result))
            i += 8

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = _metrics(served)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(2.5)  # the engine notices within 0.5 s and starts a new one
    stop.set()
    for t in threads:
        t.join(30)
    failures = [(c, t, o) for c, t, o in outcomes if isinstance(o, InferenceServerException)]
    assert all(o.status() == "StatusCode.UNAVAILABLE" for _, _, o in failures), failures[:3]
    # Only calls caught by the kill fail: the one in flight on the killed process, or a
    # connection the kernel had already queued on its listening socket. Nothing fails
    # once the socket is gone, and the survivor's calls never do.
    assert all(killed_at <= t < killed_at + 1.0 for _, t, _ in failures), failures
    per_caller = [sum(1 for c, _, _ in failures if c == s) for s in range(8)]
    assert max(per_caller) <= 2, per_caller
    assert len(outcomes) - len(failures) > 50
    pids = _frontend_pids(served)
    assert survivor in pids and victim not in pids and len(pids) == 2
    assert _call(served.url, 3.0) == 6.0
    scraped = _metrics(served)
    assert scraped["convoy_frontend_restarts_total"] == 1
    assert scraped["convoy_frontend_shared_memory_segments"] == 2  # the dead one's let go
    # The restarted front end took its predecessor's slot: its requests carry on from
    # the engine's count, never back; there are still two slots, each with a process.
    for i in (0, 1):
        key = f'convoy_frontend_requests_total{{frontend="{i}"}}'
        assert scraped.get(key, 0) >= before.get(key, 0)
        assert scraped[f'convoy_frontend_resident_memory_bytes{{frontend="{i}"}}'] > 0
    assert not any('frontend="2"' in k for k in scraped)


def test_sigterm_drains_every_process(repo: Path) -> None:
    server = start_server(repo, "--frontends", "2", "--grace-period", "20")
    pids = _frontend_pids(server)
    with ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(_call, server.url, float(i)) for i in range(8)]
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        results = [c.result(60) for c in calls]
    assert server.proc.wait(60) == 0, server.output()
    assert results == [2.0 * i for i in range(8)]
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_front_ends_stop_when_the_engine_dies(repo: Path) -> None:
    """kill -9 of the engine: nothing can be served, so the front ends stop (they would
    otherwise accept calls and fail every one), the port is closed, and no shared
    memory is left behind."""
    server = start_server(repo, "--frontends", "2")
    pids = _frontend_pids(server)
    assert _call(server.url, 1.0) == 2.0
    server.proc.kill()
    assert server.proc.wait(30) != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    failed = _call(server.url, 1.0)
    assert isinstance(failed, InferenceServerException)
    assert failed.status() == "StatusCode.UNAVAILABLE"
    assert not [
        p for p in Path("/dev/shm").glob("convoy-frontend-*") if int(p.name.split("-")[2]) in pids
    ]


def _new_frontend(server: ServerProcess, known: set[int], within_s: float) -> int | None:
    """A front-end pid not in `known`, once one is spawned within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        fresh = set(_frontend_pids(server)) - known
        if fresh:
            return fresh.pop()
        time.sleep(0.02)
    return None


def test_a_front_end_that_dies_while_starting_is_restarted_without_waiting(
    served: ServerProcess,
) -> None:
    """Its replacement killed before it listened: the next one is spawned in about a
    second (its slot backs off), not once a 60 s start-up wait has run out."""
    known = set(_frontend_pids(served))
    os.kill(sorted(known)[0], signal.SIGKILL)
    first = _new_frontend(served, known, 10)
    assert first is not None
    known.add(first)
    os.kill(first, signal.SIGKILL)  # still importing: it has not listened yet
    killed_at = time.monotonic()
    second = _new_frontend(served, known, 10)
    assert second is not None, "no front end started within 10 s of the second kill"
    assert time.monotonic() - killed_at < 5
    deadline = time.monotonic() + 30
    while _metrics(served)["convoy_frontend_restarts_total"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metrics(served)["convoy_frontend_restarts_total"] == 2
    assert _call(served.url, 4.0) == 8.0


def test_sigterm_while_a_front_end_restarts_stops_within_the_grace_period(repo: Path) -> None:
    server = start_server(repo, "--frontends", "2", "--grace-period", "2")
    known = set(_frontend_pids(server))
    os.kill(sorted(known)[0], signal.SIGKILL)
    assert _new_frontend(server, known, 10) is not None
    server.proc.send_signal(signal.SIGTERM)  # the replacement is still starting
    start = time.monotonic()
    assert server.proc.wait(30) == 0, server.output()
    assert time.monotonic() - start < 15, server.output()


SLEEPY = _sleeper(10)


def test_calls_in_flight_when_the_engine_dies_fail_at_once_not_after_the_grace_period(
    repo: Path,
) -> None:
    _python_model(
        repo, "sleepy", SLEEPY, 1,
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "instance_group [ { count: 4 kind: KIND_CPU } ]\n",
    )  # fmt: skip
    server = start_server(repo, "--frontends", "2", "--grace-period", "30")

    def call(value: float) -> tuple[float, InferenceServerException | None]:
        client = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
        try:
            client.infer("sleepy", [_tensor("X", np.full((1, 1), value, np.float32))])
            return time.monotonic(), None
        except InferenceServerException as exc:
            return time.monotonic(), exc
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(call, float(i)) for i in range(4)]
        time.sleep(1.0)  # all four are running in the engine
        server.proc.kill()
        killed_at = time.monotonic()
        outcomes = [c.result(60) for c in calls]
    for answered_at, error in outcomes:
        assert error is not None and error.status() == "StatusCode.UNAVAILABLE", error
        assert answered_at - killed_at < 4, answered_at - killed_at  # not the 30 s grace


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_sigterm_with_a_batch_stuck_past_the_grace_period_exits_within_it(
    repo: Path, frontends: str
) -> None:
    """The grace period bounds the whole shutdown, not each of its stages in turn: a
    10 s batch under a 2 s grace period is given up at about 2 s and the process exits,
    instead of front ends, engine link, gRPC server and model drains each waiting 2 s."""
    _python_model(
        repo, "sleepy", SLEEPY, 1,
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n',
    )  # fmt: skip
    server = start_server(repo, "--frontends", frontends, "--grace-period", "2")
    client = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.infer, "sleepy", [_tensor("X", np.full((1, 1), 1.0, np.float32))])
        time.sleep(1.0)  # running in the engine
        server.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert server.proc.wait(30) == 0, server.output()
        took = time.monotonic() - start
        with pytest.raises(InferenceServerException):
            call.result(30)
    client.close()
    assert took < 5, (took, server.output())
    # Only the stuck instance is given up on; the idle ones (the other models') are
    # given their second to stop even with no grace period left.
    abandoned = [line for line in server.output().splitlines() if "abandoned" in line]
    assert len(abandoned) == 1 and "sleepy" in abandoned[0], abandoned


SECOND = _sleeper(1.0)


def test_calls_cancelled_by_their_clients_leave_the_engine_s_queue(repo: Path) -> None:
    """Through a front end, as in one process: requests whose callers cancelled are
    dropped from the queue, so a later caller waits for the batch running, not for
    every abandoned one (16 cancelled on a 1 s model, 4 a batch: 4 s if they stayed)."""
    _python_model(
        repo, "second", SECOND, 4,
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 1000 }\n",
    )  # fmt: skip
    server = start_server(repo, "--frontends", "2")
    client = grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
    x = [_tensor("X", np.full((1, 1), 1.0, np.float32))]
    calls = [client.async_infer("second", x, lambda result, error: None) for _ in range(16)]
    time.sleep(0.3)  # the first batch is running, the rest queued
    for call in calls:
        call.cancel()
    time.sleep(0.2)
    answer = client.infer("second", x)
    assert answer.as_numpy("Y")[0, 0] == 2.0
    stats = client.get_inference_statistics("second", as_json=True)["model_stats"][0]
    assert int(stats["execution_count"]) <= 2, stats  # the running batch and ours
    client.close()
    server.stop()


ECHO = """
class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {"Y": inputs["X"] + 1}
"""

DOUBLE_TINY = """
name: "double_tiny"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling {
  step [
    { model_name: "tiny" model_version: -1
      input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "mid" } },
    { model_name: "tiny" model_version: -1
      input_map { key: "INPUT0" value: "mid" } output_map { key: "OUTPUT0" value: "OUT" } }
  ]
}
"""


def _tensor(name: str, x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_every_inference_path_through_the_engine_link(repo: Path) -> None:
    """Through two front ends, each path a ModelInfer takes in the engine: a queued
    model, an ensemble, the response cache, and refusals at decode, at the cache's
    bypass parameter and at routing; under concurrency every call gets its own,
    correct answer."""
    _python_model(
        repo, "echo", ECHO, 8,
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        "response_cache { enable: true }\n",
    )  # fmt: skip
    (repo / "double_tiny" / "1").mkdir(parents=True)
    (repo / "double_tiny" / "config.pbtxt").write_text(DOUBLE_TINY)
    server = start_server(repo, "--frontends", "2", "--cache-config", "local,size=1048576")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        x = np.arange(16, dtype=np.float32).reshape(1, 16)

        def tiny(value: float, via: grpcclient.InferenceServerClient = client) -> None:
            v = np.full((1, 16), value, np.float32)
            out = via.infer("tiny", [_tensor("INPUT0", v)]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(out, 2 * v + 1)

        def double(value: float, via: grpcclient.InferenceServerClient = client) -> None:
            v = np.full((1, 16), value, np.float32)
            out = via.infer("double_tiny", [_tensor("IN", v)]).as_numpy("OUT")
            np.testing.assert_array_equal(out, 4 * v + 3)

        def echo(value: float, via: grpcclient.InferenceServerClient = client) -> None:
            v = np.full((1, 4), value, np.float32)
            np.testing.assert_array_equal(via.infer("echo", [_tensor("X", v)]).as_numpy("Y"), v + 1)

        # Refusals: at decode (counted as the model's failures), at the bypass parameter
        # (checked whether or not a cache serves the model), at the version.
        failed = int(
            client.get_inference_statistics("tiny", as_json=True)["model_stats"][0][
                "inference_stats"
            ]["fail"].get("count", 0)
        )
        wrong = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        wrong.set_data_from_numpy(np.zeros((1, 16), np.int32))
        with pytest.raises(InferenceServerException, match="datatype 'INT32'") as info:
            client.infer("tiny", [wrong])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        assert int(stats["inference_stats"]["fail"]["count"]) == failed + 1
        with pytest.raises(InferenceServerException, match="response_cache") as info:
            client.infer("tiny", [_tensor("INPUT0", x)], parameters={"response_cache": "no"})
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [_tensor("INPUT0", x)], model_version="9")
        assert info.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")

        echo(1.0)
        echo(1.0)  # the second from the cache
        cached = client.get_inference_statistics("echo")
        assert cached.model_stats[0].inference_stats.cache_hit.count == 1
        assert cached.model_stats[0].execution_count == 1

        # Twelve connections of their own, spread by the kernel over both front ends.
        clients = [
            grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION)
            for _ in range(12)
        ]
        calls = [(f, float(i)) for i in range(40) for f in (tiny, double, echo)]
        before = _metrics(server)
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda n: calls[n][0](calls[n][1], clients[n % 12]), range(len(calls))))
        after = _metrics(server)
        stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        # 40 direct calls and two per ensemble call, beside the first ones above.
        assert int(stats["inference_count"]) >= 40 + 2 * 40
        passed = [
            after[k] - before.get(k, 0)
            for k in (f'convoy_frontend_requests_total{{frontend="{i}"}}' for i in (0, 1))
        ]
        assert sum(passed) == len(calls) and min(passed) > 0, passed
        for each in (client, *clients):
            each.close()
    finally:
        server.stop()
