"""CUDA-graph capture of PyTorch instances: thread-local mode, one capture at a time
in the process, one memory pool per instance. Checked on the CPU with torch's
capture API replaced by a recorder; the real capture runs where a GPU is lent."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convoy.backends.pytorch import PROCESS_GRAPH_CAPTURE, GraphCapture, TorchScriptBackend
from convoy.config import read_model_config, validate_model_config
from convoy.scheduling.devices import cuda_device_count

CONFIG = """
name: "g"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
parameters { key: "cuda_graph_batch_sizes" value { string_value: "2,8" } }
"""


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def model(tmp_path: Path) -> tuple[Any, Path]:
    (tmp_path / "g/1").mkdir(parents=True)
    (tmp_path / "g/config.pbtxt").write_text(CONFIG)
    torch.jit.script(Double()).save(str(tmp_path / "g/1/model.pt"))
    spec = validate_model_config(read_model_config(tmp_path / "g"), "g/config.pbtxt", "g")
    return spec, tmp_path / "g/1/model.pt"


class CaptureRecorder:
    """Stands in for torch.cuda.graph & co: records each capture, and any overlap."""

    def __init__(self) -> None:
        self.captures: list[tuple[str, object, str]] = []  # (thread, pool, mode)
        self.active = 0
        self.overlapped = False
        self.pools = 0

    def graph_pool_handle(self) -> object:
        self.pools += 1
        return object()

    @contextlib.contextmanager
    def graph(self, graph: object, pool: object = None, stream: object = None,
              capture_error_mode: str = "global") -> Iterator[None]:  # fmt: skip
        self.active += 1
        self.overlapped |= self.active > 1
        time.sleep(0.02)  # long enough for another thread's capture to overlap
        self.captures.append((threading.current_thread().name, pool, capture_error_mode))
        try:
            yield
        finally:
            self.active -= 1


@pytest.fixture()
def recorder(monkeypatch: pytest.MonkeyPatch) -> CaptureRecorder:
    fake = CaptureRecorder()
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", fake.graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())

    class Stream:
        def synchronize(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    return fake


def test_captures_are_thread_local_one_at_a_time_with_a_pool_per_instance(
    tmp_path: Path, recorder: CaptureRecorder
) -> None:
    spec, path = model(tmp_path)
    capture = GraphCapture()  # what the process holds once (PROCESS_GRAPH_CAPTURE)
    backends = [TorchScriptBackend(path, "cpu", spec, capture) for _ in range(2)]

    def load(backend: TorchScriptBackend) -> None:
        for bucket in (8, 2):
            backend._capture(bucket, [torch.zeros((bucket, 4))])

    threads = [
        threading.Thread(target=load, args=(b,), name=f"load-{i}") for i, b in enumerate(backends)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(recorder.captures) == 4 and not recorder.overlapped
    assert {mode for _, _, mode in recorder.captures} == {"thread_local"}
    pools = {name: {id(pool) for n, pool, _ in recorder.captures if n == name} for name in
             ("load-0", "load-1")}  # fmt: skip
    assert all(len(p) == 1 for p in pools.values())  # one pool for all of an instance's graphs
    assert pools["load-0"] != pools["load-1"] and recorder.pools == 2


def test_backends_share_the_process_capture_by_default(tmp_path: Path) -> None:
    spec, path = model(tmp_path)
    backend = TorchScriptBackend(path, "cpu", spec)
    assert backend._graph_capture is PROCESS_GRAPH_CAPTURE


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none on this machine)")
def test_capturing_on_a_load_thread_does_not_fail_a_serving_instance(tmp_path: Path) -> None:
    spec, path = model(tmp_path)
    serving = TorchScriptBackend(path, "cuda:0", spec)
    serving.prepare()
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        x = np.ones((3, 4), np.float32)
        while not stop.is_set():
            try:
                np.testing.assert_allclose(serving.run({"x": x}, ["y"])["y"], x * 2)
                # Allocation and synchronisation outside any graph, as another model would.
                torch.empty((1 << 20,), device="cuda:0").sum().item()
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(5):
            loading = TorchScriptBackend(path, "cuda:0", spec)
            loading.prepare()  # captures buckets 8 and 2 while `serving` runs
            loading.close()
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
