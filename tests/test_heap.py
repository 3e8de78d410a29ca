"""The heap is frozen once models are loaded and settled again after loads and
unloads: full collections skip the models' objects, and an unloaded model's
objects are still freed although they were frozen."""

from __future__ import annotations

import asyncio
import gc
import sys
import types
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from convoy.heap import HeapSettler, Settled, settle
from convoy.metrics import Metrics
from convoy.repository.manager import ModelRepository


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test process collects as usual


class _Cyclic:
    def __init__(self) -> None:
        self.me = self  # freed only by the cyclic collector


def test_settle_freezes_what_is_alive_and_frees_frozen_cycles_next_time() -> None:
    node = _Cyclic()
    ref = weakref.ref(node)
    first = settle()
    assert first.frozen > 0
    # Other threads of the test process (earlier modules' servers and loops) may free a
    # few frozen objects meanwhile: the count only falls, and by little.
    assert first.frozen * 0.99 <= gc.get_freeze_count() <= first.frozen
    del node
    gc.collect()
    assert ref() is not None  # frozen: a full collection does not even look at it
    second = settle()
    assert ref() is None
    assert second.collected >= 1


def test_settles_once_after_a_burst_and_not_while_busy() -> None:
    calls: list[float] = []
    busy = [False]

    def collect() -> Settled:
        calls.append(asyncio.get_running_loop().time())
        return Settled(0, 0, 0.0)

    async def scenario() -> None:
        settler = HeapSettler(lambda: busy[0], quiet_s=0.05, collect=collect)
        for _ in range(5):  # a burst of loads: one settle, after the last
            settler.changed()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert len(calls) == 1
        busy[0] = True  # another load still running: it calls changed() when done
        settler.changed()
        await asyncio.sleep(0.2)
        assert len(calls) == 1
        busy[0] = False
        settler.changed()
        await asyncio.sleep(0.2)
        assert len(calls) == 2
        settler.close()
        settler.changed()  # shutting down: nothing more
        await asyncio.sleep(0.2)
        assert len(calls) == 2

    asyncio.run(scenario())


_CYCLIC_MODEL = """
import sys
import weakref


class Model:
    def __init__(self, config):
        self.me = self  # a cycle: only the cyclic collector frees it
        sys.modules["convoy_heap_probe"].seen.append(weakref.ref(self))

    def __call__(self, inputs):
        return {"Y": inputs["X"]}
"""


def test_an_unloaded_models_frozen_objects_are_freed(tmp_path: Path) -> None:
    (tmp_path / "cyclic" / "1").mkdir(parents=True)
    (tmp_path / "cyclic" / "1" / "model.py").write_text(_CYCLIC_MODEL)
    (tmp_path / "cyclic" / "config.pbtxt").write_text(
        'name: "cyclic"\nbackend: "convoy_python"\nmax_batch_size: 8\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    probe = types.ModuleType("convoy_heap_probe")
    probe.seen = []  # type: ignore[attr-defined]
    sys.modules["convoy_heap_probe"] = probe

    async def scenario() -> None:
        repo = ModelRepository(tmp_path, Metrics(gpus=list))
        settler = HeapSettler(lambda: repo.busy, quiet_s=0.05)
        repo.on_finished = settler.changed
        await repo.load("cyclic")
        settler.now()  # start-up: the loaded model is frozen
        [model] = probe.seen
        await repo.unload("cyclic")
        gc.collect()
        assert model() is not None, "frozen objects are out of reach of a collection"
        await asyncio.sleep(0.5)  # the settle after the unload
        assert model() is None, "the unloaded model's objects were not freed"
        assert settler.last is not None and settler.last.collected > 0
        await repo.close()

    try:
        asyncio.run(scenario())
    finally:
        del sys.modules["convoy_heap_probe"]


@pytest.mark.e2e
def test_the_server_freezes_before_serving_and_settles_after_a_reload(
    examples_dir: Path, tmp_path: Path
) -> None:
    import time
    import urllib.request

    import tritonclient.grpc as grpcclient

    from .conftest import make_repository, start_server

    server = start_server(make_repository(tmp_path / "repo", examples_dir, ("tiny",)))
    try:

        def settled() -> list[str]:
            return [line for line in server.log if "heap settled:" in line]

        first = settled()
        assert len(first) == 1, server.log
        assert int(first[0].split("heap settled: ")[1].split()[0]) > 10_000
        serving = next(i for i, line in enumerate(server.log) if "convoy serving" in line)
        assert server.log.index(first[0]) < serving  # frozen before the first request
        grpcclient.InferenceServerClient(server.url).load_model("tiny")  # a reload
        deadline = time.monotonic() + 15
        while len(settled()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(settled()) == 2, server.log
        scraped = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert 'convoy_gc_pause_seconds_count{generation="2"}' in scraped
        assert "process_resident_memory_bytes" in scraped
        assert 'python_gc_collections_total{generation="0"}' in scraped
    finally:
        server.stop()
    quiet = start_server(
        make_repository(tmp_path / "repo2", examples_dir, ("tiny",)), "--no-gc-freeze"
    )
    try:
        assert not [line for line in quiet.log if "heap settled" in line], quiet.log
    finally:
        quiet.stop()


def test_gc_pauses_are_measured_per_generation_until_closed() -> None:
    from prometheus_client import CollectorRegistry

    from convoy.heap import GcPauses

    registry = CollectorRegistry()
    pauses = GcPauses(registry)

    def full_collections() -> float:
        value = registry.get_sample_value("convoy_gc_pause_seconds_count", {"generation": "2"})
        return value or 0.0

    pauses.start()
    pauses.start()  # idempotent: one callback, one observation per collection
    try:
        gc.collect()
        gc.collect()
        assert full_collections() == 2
        total = registry.get_sample_value("convoy_gc_pause_seconds_sum", {"generation": "2"})
        assert total is not None and total > 0
    finally:
        pauses.close()
    gc.collect()
    assert full_collections() == 2  # closed: the interpreter's callbacks are left as found
    assert registry.get_sample_value("convoy_gc_pause_seconds_created", {"generation": "2"})
    buckets = pauses.snapshot()["2"][0]
    assert buckets[-1] == 2 and buckets == sorted(buckets)  # cumulative, +Inf last


# A collection may start inside any allocation, so inside prometheus_client while it
# holds its multiprocess mode's one lock (making a labelled child: json.dumps). The
# callback must not need that lock: it waited for its own thread, and a server hung.
MANY_CHILDREN = """
import faulthandler, gc
faulthandler.dump_traceback_later(60, exit=True)  # a hang fails in a minute, with stacks
from prometheus_client import CollectorRegistry, Counter, generate_latest
from convoy.heap import GcPauses
registry = CollectorRegistry()
pauses = GcPauses(registry)
pauses.start()
counter = Counter("children", "labelled children", ["i"], registry=registry)
gc.set_threshold(1)
for i in range(3000):
    counter.labels(str(i)).inc()
print(generate_latest(registry).decode())
"""


def test_gc_pauses_never_wait_for_prometheus_clients_lock(tmp_path: Path) -> None:
    import os
    import subprocess

    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", MANY_CHILDREN], env=env, capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    counted = [line for line in done.stdout.splitlines()
               if line.startswith('convoy_gc_pause_seconds_count{generation="0"}')]  # fmt: skip
    assert counted and float(counted[0].split()[-1]) > 100
    assert list(tmp_path.glob("counter_*.db"))  # the multiprocess mode was on
