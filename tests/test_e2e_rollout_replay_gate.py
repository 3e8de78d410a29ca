"""The rollout replay gate end to end: a real server with --capture-dir, callers'
traffic captured, then `convoy rollout start --replay-since` replays it on the
candidate inside the server before the candidate gets any traffic.

`lin` version 1 computes y = 2x (it serves), version 2 y = 3x, version 3 y = 2x again.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from .conftest import ROOT, ServerProcess, start_server
from .linear import linear_source, write_linear_model
from .test_e2e_replay import wait_for

pytestmark = pytest.mark.e2e
pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")

REQUESTS = 16


def rollout(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convoy.cli", "rollout", *args, "--server", server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def status(server: ServerProcess, started: bool = True) -> dict[str, Any]:
    """`rollout status lin --json`; `started=False`: {} while there is no rollout yet
    (`--json` then prints nothing), as a declared one is before the poll finds it."""
    done = rollout(server, "status", "lin", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    if not lines and not started:
        return {}
    document: dict[str, Any] = json.loads(lines[-1])
    return document


def answer(
    client: grpcclient.InferenceServerClient, x: float, request_id: str = ""
) -> tuple[str, float]:
    tensor = grpcclient.InferInput("X", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), x, np.float32))
    result = client.infer("lin", [tensor], request_id=request_id)
    return str(result.get_response().model_version), float(result.as_numpy("Y")[0, 0])


def test_a_candidate_is_replayed_before_it_gets_traffic(tmp_path: Path) -> None:
    repo, capture = tmp_path / "repo", tmp_path / "capture"
    lin = {v: linear_source(f) for v, f in ((1, 2), (2, 3), (3, 2))}
    write_linear_model(repo, "lin", lin, parameters={"capture_sample_rate": "1"})
    server = start_server(repo, "--capture-dir", str(capture), "--capture-flush-secs", "0.5")
    try:
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat()
        client = grpcclient.InferenceServerClient(server.url)
        for i in range(REQUESTS):
            assert answer(client, 0.5 + i) == ("1", 2 * (0.5 + i))
        wait_for(capture, "lin", REQUESTS)

        refused = rollout(server, "start", "lin", "--version", "2", "--strategy", "canary",
                          "--replay-since", since)  # fmt: skip
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "FAILED_PRECONDITION" in refused.stderr and "diff_rate" in refused.stderr
        shown = status(server)
        assert (shown["phase"], shown["stable"], shown["candidate"]) == ("refused", "1", "2")
        assert shown["replay"]["passed"] is False
        assert shown["replay"]["diff_rate"] == 1.0 and shown["replay"]["requests"] == REQUESTS
        assert any("diff_rate" in reason for reason in shown["replay"]["reasons"])
        assert answer(client, 1.0, "check") == ("1", 2.0)  # serving unchanged
        wait_for(capture, "lin", 1, prefix="check")

        started = rollout(server, "start", "lin", "--version", "3", "--strategy", "canary",
                          "--replay-since", since, "--replay-max-diff-rate", "0")  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        assert "replay:   passed" in started.stdout
        shown = status(server)
        assert (shown["phase"], shown["stable"], shown["candidate"]) == ("progressing", "1", "3")
        assert shown["replay"]["passed"] is True and shown["replay"]["diff_rate"] == 0.0
        # The first replay's own requests were captured as replays and are left out:
        # the callers' requests only, the check of serving above included.
        assert shown["replay"]["requests"] == REQUESTS + 1
        client.close()
    finally:
        assert server.stop() == 0, server.output()


def test_a_declared_rollout_replays_a_new_version_found_on_disk(tmp_path: Path) -> None:
    """rollout.json with replay_since: version 2 (y = 3x) appears on disk, the poll
    starts the declared rollout, the replay of the last hour's captured traffic refuses
    it, and the callers never see it."""
    repo, capture = tmp_path / "repo", tmp_path / "capture"
    write_linear_model(repo, "lin", {1: linear_source(2)}, parameters={"capture_sample_rate": "1"},
                       version_policy="latest { num_versions: 1 }")  # fmt: skip
    (repo / "lin" / "rollout.json").write_text(json.dumps({
        "strategy": "canary", "steps": [50, 100], "step_interval": "600s",
        "replay_since": "1h", "replay_max_diff_rate": 0.01,
    }))  # fmt: skip
    server = start_server(repo, "--capture-dir", str(capture), "--capture-flush-secs", "0.5",
                          "--repository-poll-secs", "0.5")  # fmt: skip
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for i in range(REQUESTS):
            assert answer(client, 0.5 + i) == ("1", 2 * (0.5 + i))
        wait_for(capture, "lin", REQUESTS)
        (repo / "lin" / "2").mkdir()
        (repo / "lin" / "2" / "model.py").write_text(linear_source(3))
        deadline = time.monotonic() + 60
        while (shown := status(server, started=False)).get("phase") != "refused":
            assert time.monotonic() < deadline, shown
            time.sleep(0.3)
        assert (shown["stable"], shown["candidate"]) == ("1", "2")
        assert shown["replay"]["passed"] is False and shown["replay"]["diff_rate"] == 1.0
        assert shown["replay"]["requests"] == REQUESTS
        assert {answer(client, 1.0)[0] for _ in range(10)} == {"1"}  # serving unchanged
        client.close()
    finally:
        assert server.stop() == 0, server.output()
