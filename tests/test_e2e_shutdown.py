"""SIGTERM while calls keep arriving, with no preStop delay in front of it: every call is
answered once, either served or refused with a status a client's retry policy retries
(UNAVAILABLE), never CANCELLED (which no retry policy retries)."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import make_repository, start_server

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_calls_arriving_during_sigterm_are_served_or_unavailable(
    examples_dir: Path, tmp_path: Path, frontends: str
) -> None:
    repo = make_repository(tmp_path / "repo", examples_dir, ("tiny",))
    server = start_server(repo, "--frontends", frontends, "--grace-period", "10")
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    sent = [0]

    def hammer() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        while not stop.is_set():
            with lock:
                sent[0] += 1
            try:
                client.infer("tiny", [tensor], client_timeout=30)
                outcome = "ok"
            except InferenceServerException as exc:
                outcome = str(exc.status())
            with lock:
                outcomes[outcome] += 1
            if outcome != "ok":
                time.sleep(0.2)  # as a retry policy backs off (initialBackoff 0.2 s)
        client.close()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.output()
    time.sleep(0.5)  # calls sent after the exit are refused by the kernel: UNAVAILABLE
    stop.set()
    for t in threads:
        t.join(30)
    assert sum(outcomes.values()) == sent[0]  # each call answered exactly once
    assert outcomes["ok"] > 0
    assert set(outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}, outcomes
