"""--max-connection-age-ms: the server closes connections gracefully after an age, so a
long-lived client channel reconnects (and, behind a load balancer, rebalances onto new
replicas) without a failed call."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .conftest import make_repository, start_server

pytestmark = pytest.mark.e2e


def test_connections_are_recycled_without_failing_calls(tmp_path: Path, examples_dir: Path) -> None:
    repo = make_repository(tmp_path / "repo", examples_dir, ("tiny",))
    server = start_server(repo, "--max-connection-age-ms", "400")
    try:
        channel = grpc.insecure_channel(server.url)
        states: list[grpc.ChannelConnectivity] = []
        lock = threading.Lock()

        def seen(state: grpc.ChannelConnectivity) -> None:
            with lock:
                states.append(state)

        channel.subscribe(seen, try_to_connect=True)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
        stop = time.monotonic() + 2.5
        calls = 0
        while time.monotonic() < stop:
            stub.ModelInfer(request, timeout=10)  # raises on any failed call
            calls += 1
            time.sleep(0.01)
        channel.unsubscribe(seen)
        channel.close()
        with lock:
            ready = states.count(grpc.ChannelConnectivity.READY)
        assert calls > 20
        assert ready >= 3, states  # the connection was closed and made again, several times
    finally:
        server.stop()
