"""Issue 15: the response cache through the real server and the stock tritonclient.

Hits, misses and coalescing are read from what a client can see: ModelStatistics
(cache_hit / cache_miss, inference_count, execution_count), the Prometheus
convoy_cache_* series, the raw response bytes, and the server's RSS.
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

CACHED = "response_cache { enable: true }\n"

ECHO = """
class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        return {"Y": x * 2, "Z": x + 1}
"""

# Long enough that 32 requests sent from threads all arrive while the first computes.
SLEEPY = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        time.sleep(1.5)
        return {"Y": inputs["X"] * 3}
"""

# One float in, 256 KiB out per element: a few answers fill a 1 MiB cache.
BIG = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {"Y": np.repeat(inputs["X"], 65536, axis=1)}
"""

# Per element: its length, so ["ab", "c"] and ["a", "bc"] answer differently.
TEXT = """
import numpy as np


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {"N": np.array([len(t) for t in inputs["T"].reshape(-1)], np.int64)}
"""

# The answer's factor is read from config.pbtxt at load: a reload can change it.
FACTOR = """
import time


class Model:
    def __init__(self, config):
        self.factor = float(config["factor"])

    def __call__(self, inputs):
        time.sleep(3.0)
        return {"Y": inputs["X"] * self.factor}
"""

VERSIONED = """
class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {{"Y": inputs["X"] * {version}}}
"""

XY = """
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
"""
XYZ = """
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1, -1 ] },
         { name: "Z" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
"""
CACHE_SIZE = 64 << 20
SMALL_CACHE = 1 << 20


def _model(repo: Path, name: str, config: str, sources: dict[int, str]) -> None:
    for version, source in sources.items():
        (repo / name / str(version)).mkdir(parents=True)
        (repo / name / str(version) / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "convoy_python"\n{config}')


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("cache"), examples_dir, ("image_classifier",))
    config = repo / "image_classifier" / "config.pbtxt"
    config.write_text(config.read_text() + CACHED)
    _model(repo, "echo", "max_batch_size: 0\n" + XYZ + CACHED, {1: ECHO})
    _model(repo, "echo_plain", "max_batch_size: 0\n" + XYZ, {1: ECHO})  # no switch
    one = XY.replace("[ -1, -1 ]", "[ 1 ]")
    _model(repo, "sleepy", "max_batch_size: 1\n" + one + CACHED, {1: SLEEPY})
    _model(
        repo,
        "text",
        """max_batch_size: 0
input [ { name: "T" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "N" data_type: TYPE_INT64 dims: [ -1 ] } ]
"""
        + CACHED,
        {1: TEXT},
    )
    _model(repo, "factor", _factor_config(3), {1: FACTOR})
    _model(
        repo,
        "versioned",
        "max_batch_size: 0\n" + XY + CACHED + "version_policy: { all { } }\n",
        {v: VERSIONED.format(version=v) for v in (1, 2)},
    )
    proc = start_server(repo, "--cache-config", f"local,size={CACHE_SIZE}")
    yield proc
    proc.stop()


def _factor_config(factor: int) -> str:
    one = XY.replace("[ -1, -1 ]", "[ 1 ]")
    return (
        f"max_batch_size: 1\n{one}{CACHED}"
        f'parameters {{ key: "factor" value {{ string_value: "{factor}" }} }}\n'
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose cache holds only a few of `big`'s answers."""
    repo = tmp_path_factory.mktemp("small-cache")
    _model(
        repo,
        "big",
        "max_batch_size: 0\n" + XY.replace("[ -1, -1 ]", "[ 1, -1 ]") + CACHED,
        {1: BIG},
    )
    proc = start_server(repo, "--cache-config", f"local,size={SMALL_CACHE}")
    yield proc
    proc.stop()


@pytest.fixture()
def client(served: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(served.url)
    yield c
    c.close()


_values = itertools.count(1)


def _fresh(n: int = 3) -> np.ndarray:
    """Inputs no other test sends (one row of n): every test starts from an empty cache
    for its keys."""
    start = next(_values) * 1000
    return np.arange(start, start + n, dtype=np.float32).reshape(1, n)


def _x(value: np.ndarray, name: str = "X") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
    tensor.set_data_from_numpy(value)
    return tensor


@dataclass(frozen=True)
class Counts:
    inferences: int
    executions: int
    hits: int
    misses: int
    successes: int


def _counts(client: grpcclient.InferenceServerClient, model: str, version: str = "1") -> Counts:
    stats = client.get_inference_statistics(model, version).model_stats
    (s,) = (s for s in stats if s.version == version)
    i = s.inference_stats
    return Counts(
        s.inference_count, s.execution_count, i.cache_hit.count, i.cache_miss.count, i.success.count
    )


def _delta(after: Counts, before: Counts) -> Counts:
    return Counts(
        *(a - b for a, b in zip(vars(after).values(), vars(before).values(), strict=True))
    )


def _raw(result: grpcclient.InferResult) -> list[bytes]:
    return list(result.get_response().raw_output_contents)


def _metrics(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _metric(text: str, name: str, model: str, version: str = "1") -> float:
    """One convoy_cache_* sample; 0 where the series is absent (never used)."""
    pattern = rf'^{name}{{model="{re.escape(model)}",version="{version}"}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def _rss(server: ServerProcess) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024


def test_repeats_hit_byte_identical_without_running_the_model(
    client: grpcclient.InferenceServerClient,
) -> None:
    image = np.random.default_rng(15).random((1, 3, 64, 64), dtype=np.float32)
    before = _counts(client, "image_classifier")
    computed = client.infer("image_classifier", [_x(image, "INPUT")], request_id="first")
    hits = [
        client.infer("image_classifier", [_x(image, "INPUT")], request_id=f"again-{i}")
        for i in range(3)
    ]
    bypassed = client.infer(
        "image_classifier", [_x(image, "INPUT")], parameters={"response_cache": False}
    )
    delta = _delta(_counts(client, "image_classifier"), before)
    assert (delta.hits, delta.misses) == (3, 1)
    assert (delta.inferences, delta.executions) == (2, 2)  # the miss and the bypass only
    assert delta.successes == 2 + delta.hits  # Triton counts hits as successes
    # A hit is the computed answer, byte for byte, under the request's own id; and the
    # computed answer is what the model gives today (the bypass ran it again).
    for hit in hits:
        assert _raw(hit) == _raw(computed)
    assert _raw(bypassed) == _raw(computed)
    assert [h.get_response().id for h in hits] == ["again-0", "again-1", "again-2"]


def test_different_inputs_shapes_outputs_or_class_counts_miss(
    client: grpcclient.InferenceServerClient,
) -> None:
    x = _fresh(4).reshape(1, 4)
    y = grpcclient.InferRequestedOutput("Y")
    z = grpcclient.InferRequestedOutput("Z")
    asks: list[tuple[np.ndarray, list[grpcclient.InferRequestedOutput]]] = [
        (x, [y]),
        (x + 0.5, [y]),  # other bytes
        (x[:, :3], [y]),  # other shape
        (x.reshape(2, 2), [y]),  # same bytes, other shape
        (x, [z]),  # other output
        (x, [y, z]),  # more outputs
        (x, [grpcclient.InferRequestedOutput("Y", class_count=2)]),
        (x, [grpcclient.InferRequestedOutput("Y", class_count=3)]),
    ]
    before = _counts(client, "echo")
    first = [client.infer("echo", [_x(v)], outputs=o) for v, o in asks]
    delta = _delta(_counts(client, "echo"), before)
    assert (delta.misses, delta.hits, delta.inferences) == (len(asks), 0, len(asks))
    # Each answer is its own request's, not a neighbour's from the cache.
    assert np.array_equal(first[1].as_numpy("Y"), (x + 0.5) * 2)
    assert first[2].as_numpy("Y").shape == (1, 3)
    assert first[3].as_numpy("Y").shape == (2, 2)
    assert first[4].as_numpy("Y") is None and np.array_equal(first[4].as_numpy("Z"), x + 1)
    assert first[6].as_numpy("Y").shape == (2,) and first[7].as_numpy("Y").shape == (3,)

    # Asked again, each is a hit with its own answer; [Z, Y] is the same computation as
    # [Y, Z], answered in the order asked.
    again = [client.infer("echo", [_x(v)], outputs=o) for v, o in asks]
    swapped = client.infer("echo", [_x(x)], outputs=[z, y])
    delta = _delta(_counts(client, "echo"), before)
    assert (delta.hits, delta.inferences) == (len(asks) + 1, len(asks))
    assert [_raw(r) for r in again] == [_raw(r) for r in first]
    assert [o.name for o in swapped.get_response().outputs] == ["Z", "Y"]
    assert _raw(swapped) == _raw(first[5])[::-1]


def test_bytes_inputs_are_keyed_by_element(client: grpcclient.InferenceServerClient) -> None:
    def ask(*items: bytes) -> list[int]:
        tensor = grpcclient.InferInput("T", [len(items)], "BYTES")
        tensor.set_data_from_numpy(np.array(items, dtype=np.object_))
        answer = client.infer("text", [tensor]).as_numpy("N")
        assert answer is not None
        return [int(n) for n in answer]

    tag = str(next(_values)).encode()
    before = _counts(client, "text")
    assert ask(tag + b"ab", b"c") == [len(tag) + 2, 1]
    assert ask(tag + b"a", b"bc") == [len(tag) + 1, 2]  # same bytes, split elsewhere
    assert ask(tag + b"ab", b"c") == [len(tag) + 2, 1]
    delta = _delta(_counts(client, "text"), before)
    assert (delta.misses, delta.hits) == (2, 1)


def test_a_model_without_the_switch_is_never_cached(
    served: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = _fresh()
    before = _counts(client, "echo_plain")
    answers = [client.infer("echo_plain", [_x(x)]) for _ in range(3)]
    delta = _delta(_counts(client, "echo_plain"), before)
    assert (delta.inferences, delta.hits, delta.misses) == (3, 0, 0)
    assert all(_raw(a) == _raw(answers[0]) for a in answers)
    assert 'convoy_cache_misses_total{model="echo_plain"' not in _metrics(served)


def test_the_bypass_parameter_neither_reads_nor_writes(
    client: grpcclient.InferenceServerClient,
) -> None:
    x = _fresh()
    before = _counts(client, "echo")
    client.infer("echo", [_x(x)], parameters={"response_cache": False})  # not stored
    client.infer("echo", [_x(x)])  # so this one misses and stores
    client.infer("echo", [_x(x)], parameters={"response_cache": False})  # not read
    client.infer("echo", [_x(x)], parameters={"response_cache": True})  # read
    delta = _delta(_counts(client, "echo"), before)
    assert (delta.inferences, delta.misses, delta.hits) == (3, 1, 1)
    with pytest.raises(InferenceServerException, match="must be a bool") as refused:
        client.infer("echo", [_x(x)], parameters={"response_cache": "false"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_versions_never_share_answers(client: grpcclient.InferenceServerClient) -> None:
    x = _fresh()
    one = client.infer("versioned", [_x(x)], model_version="1").as_numpy("Y")
    two = client.infer("versioned", [_x(x)], model_version="2").as_numpy("Y")
    assert one is not None and two is not None
    assert np.array_equal(one, x) and np.array_equal(two, 2 * x)
    assert _counts(client, "versioned", "2").misses >= 1


def test_a_reload_empties_only_that_models_entries(
    served: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = _fresh()
    client.infer("echo", [_x(x)])
    client.infer("text", [_bytes_input(b"kept")])
    metrics = _metrics(served)
    assert _metric(metrics, "convoy_cache_entries", "echo") >= 1
    kept = _metric(metrics, "convoy_cache_entries", "text")
    assert kept >= 1

    client.load_model("echo")  # a reload of the loaded model
    metrics = _metrics(served)
    assert _metric(metrics, "convoy_cache_entries", "echo") == 0
    assert _metric(metrics, "convoy_cache_bytes", "echo") == 0
    assert _metric(metrics, "convoy_cache_entries", "text") == kept
    before = _counts(client, "echo")
    client.infer("echo", [_x(x)])  # computed by the reloaded model
    delta = _delta(_counts(client, "echo"), before)
    assert (delta.inferences, delta.misses, delta.hits) == (1, 1, 0)


def test_after_a_reload_no_request_gets_the_old_models_answer(
    served: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = _fresh(1)
    assert served.repository is not None
    config = served.repository / "factor" / "config.pbtxt"
    with ThreadPoolExecutor(2) as pool:
        old = pool.submit(client.infer, "factor", [_x(x)])  # computing for 3 s
        time.sleep(0.3)
        config.write_text(f'name: "factor"\nbackend: "convoy_python"\n{_factor_config(5)}')
        loads = served.output().count("model 'factor' ready")
        reload = pool.submit(client.load_model, "factor")  # returns once the old one drains
        while served.output().count("model 'factor' ready") == loads:
            time.sleep(0.01)
        if old.done():
            pytest.skip("the reload took longer than the computation it should overlap")
        after = client.infer("factor", [_x(x)]).as_numpy("Y")  # the new model serves now
        assert old.result().as_numpy("Y") == pytest.approx(x * 3)
        reload.result()
    assert after == pytest.approx(x * 5)


def _bytes_input(item: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("T", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([item], dtype=np.object_))
    return tensor


def test_32_identical_concurrent_requests_compute_once(
    served: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = _fresh(1)
    before = _counts(client, "sleepy")
    coalesced_before = _metric(_metrics(served), "convoy_cache_coalesced_total", "sleepy")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: client.infer("sleepy", [_x(x)]), range(32)))
    delta = _delta(_counts(client, "sleepy"), before)
    assert (delta.inferences, delta.executions) == (1, 1)
    assert (delta.misses, delta.hits, delta.successes) == (1, 31, 32)
    # Computed once is the point; how many overlapped the computation (rather than
    # arriving after it and hitting the stored entry) depends on thread scheduling.
    coalesced = _metric(_metrics(served), "convoy_cache_coalesced_total", "sleepy")
    assert 1 <= coalesced - coalesced_before <= 31
    assert all(_raw(a) == _raw(answers[0]) for a in answers)
    assert np.array_equal(answers[0].as_numpy("Y"), x * 3)


def test_prometheus_exports_hits_misses_and_capacity(
    served: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = _fresh()
    metrics = _metrics(served)
    hits0 = _metric(metrics, "convoy_cache_hits_total", "echo")
    misses0 = _metric(metrics, "convoy_cache_misses_total", "echo")
    for _ in range(3):
        client.infer("echo", [_x(x)])
    metrics = _metrics(served)
    assert _metric(metrics, "convoy_cache_hits_total", "echo") - hits0 == 2
    assert _metric(metrics, "convoy_cache_misses_total", "echo") - misses0 == 1
    # The counters are the statistics, seen from Prometheus.
    counts = _counts(client, "echo")
    assert _metric(metrics, "convoy_cache_hits_total", "echo") == counts.hits
    capacity = re.search(r"^convoy_cache_capacity_bytes (\S+)$", metrics, re.MULTILINE)
    assert capacity is not None and float(capacity[1]) == CACHE_SIZE


def test_the_byte_limit_holds_under_distinct_requests(small: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(small.url)

    def stream(start: int, count: int) -> None:
        for i in range(start, start + count):
            answer = client.infer("big", [_x(np.full((1, 1), i, np.float32))]).as_numpy("Y")
            assert answer is not None and answer.shape == (1, 65536) and answer[0, -1] == i

    # Warm first: gRPC buffers and allocator arenas grow to their working size.
    stream(0, 60)
    rss = _rss(small)
    used = []
    for start in range(60, 460, 50):
        stream(start, 50)
        metrics = _metrics(small)
        used.append(_metric(metrics, "convoy_cache_bytes", "big"))
    growth = _rss(small) - rss
    # 400 answers of 256 KiB would hold 100 MiB; the cache keeps at most 1 MiB.
    assert growth < 16 << 20, f"RSS grew {growth / 2**20:.1f} MiB"
    assert 0 < max(used) <= SMALL_CACHE
    assert _metric(metrics, "convoy_cache_evictions_total", "big") >= 400 - 4
    assert 1 <= _metric(metrics, "convoy_cache_entries", "big") <= 4
    # An answer larger than the whole cache is answered, not stored, and evicts nothing.
    entries = _metric(metrics, "convoy_cache_entries", "big")
    wide = np.arange(5, dtype=np.float32).reshape(1, 5)
    before = _counts(client, "big")
    for _ in range(2):
        answer = client.infer("big", [_x(wide)]).as_numpy("Y")
        assert answer is not None and answer.shape == (1, 5 * 65536)
    assert _delta(_counts(client, "big"), before).inferences == 2
    assert _metric(_metrics(small), "convoy_cache_entries", "big") == entries
    client.close()
