"""Rollouts end to end: the stock tritonclient sends steady load while `convoy rollout`
(the CLI, over the admin service) starts canary, blue-green, shadow and A/B rollouts
of convoy_python candidate versions; the server promotes or rolls back by itself."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, ServerProcess, start_server

pytestmark = pytest.mark.e2e

# y = FACTOR * x; version 3 fails every fifth request, version 4 is 60 ms slower.
VERSION_SOURCE = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        if {fail} and (x.astype(int) % 5 == 0).any():
            raise RuntimeError("injected candidate failure")
        time.sleep({sleep})
        return {{"Y": x * {factor}}}
"""
VERSIONS = {
    1: dict(factor=2, fail=False, sleep=0.0),
    2: dict(factor=2, fail=False, sleep=0.0),  # a good candidate
    3: dict(factor=2, fail=True, sleep=0.0),  # fails ~20% of requests
    4: dict(factor=2, fail=False, sleep=0.06),  # 60 ms slower
    5: dict(factor=3, fail=False, sleep=0.0),  # changed outputs
}
CONFIG = """
name: "lin"
backend: "convoy_python"
max_batch_size: 1
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { specific { versions: [ 1 ] } }
"""


def write_repository(root: Path) -> Path:
    model = root / "lin"
    for version, kind in VERSIONS.items():
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.py").write_text(VERSION_SOURCE.format(**kind))
    (model / "9").mkdir()
    (model / "9" / "model.py").write_text("raise ImportError('this version cannot load')\n")
    (model / "config.pbtxt").write_text(CONFIG)
    return root


@dataclass
class Load:
    """Steady unversioned requests from a few threads; every outcome recorded once."""

    url: str
    threads: int = 4
    key_space: int = 0  # > 0: each request carries an A/B key
    answers: list[tuple[str, float, float]] = field(default_factory=list)  # version, x, y
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # x, status, message
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def _run(self, seed: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        i = seed
        while not self._stop.is_set():
            i += self.threads
            x = float(i % 1000 + 1)
            tensor = grpcclient.InferInput("X", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1), x, np.float32))
            with self._lock:
                self.sent += 1
            try:
                result = client.infer("lin", [tensor])
                version = result.get_response().model_version
                with self._lock:
                    self.answers.append((version, x, float(result.as_numpy("Y")[0, 0])))
            except InferenceServerException as exc:
                with self._lock:
                    self.failures.append((x, str(exc.status()), exc.message() or ""))
            time.sleep(0.005)
        client.close()

    def versions(self) -> Counter[str]:
        with self._lock:
            return Counter(v for v, _, _ in self.answers)


def rollout(
    server: ServerProcess, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convoy.cli", "rollout", *args, "--server", server.url],
        cwd=ROOT, capture_output=True, text=True, check=check, timeout=60,
    )  # fmt: skip


def status(server: ServerProcess) -> dict[str, object]:
    out = rollout(server, "status", "lin", "--json").stdout.strip()
    return json.loads(out.splitlines()[-1]) if out else {}


def wait_phase(server: ServerProcess, phases: tuple[str, ...], timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        current = status(server)
        if current.get("phase") in phases:
            return current
        assert time.monotonic() < deadline, current
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = write_repository(tmp_path_factory.mktemp("rollouts"))
    proc = start_server(repo)
    yield proc
    proc.stop()


def default_version(server: ServerProcess) -> str:
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("X", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    version = client.infer("lin", [tensor]).get_response().model_version
    client.close()
    return str(version)


def test_bad_control_input_is_refused_and_serving_is_unchanged(served: ServerProcess) -> None:
    cases = [
        (("start", "nosuch", "--version", "2", "--strategy", "canary"), "NOT_FOUND"),
        (("start", "lin", "--version", "7", "--strategy", "canary"), "NOT_FOUND"),
        (("start", "lin", "--version", "2", "--strategy", "canary", "--steps", "5,150"), "150"),
        (("start", "lin", "--version", "9", "--strategy", "canary"), "cannot load"),
        (("promote", "lin"), "no rollout"),
    ]
    for args, expected in cases:
        result = rollout(served, *args, check=False)
        assert result.returncode != 0, (args, result.stdout)
        assert expected in result.stderr, (args, result.stderr)
    assert default_version(served) == "1"
    # Two rollouts on one model: the second is refused, the first goes on.
    rollout(served, "start", "lin", "--version", "2", "--strategy", "canary",
            "--steps", "50,100", "--step-interval", "60s")  # fmt: skip
    second = rollout(served, "start", "lin", "--version", "4", "--strategy", "canary", check=False)
    assert second.returncode != 0 and "already has a canary rollout" in second.stderr
    assert status(served)["candidate"] == "2"
    rollout(served, "rollback", "lin")
    assert status(served)["phase"] == "rolled_back"
    assert default_version(served) == "1"


def test_a_good_canary_is_promoted_through_every_step(served: ServerProcess) -> None:
    with Load(served.url) as load:
        time.sleep(0.5)
        rollout(served, "start", "lin", "--version", "2", "--strategy", "canary",
                "--steps", "25,50,100", "--step-interval", "2s", "--min-requests", "20",
                "--max-error-rate", "0.02")  # fmt: skip
        final = wait_phase(served, ("promoted", "rolled_back"), timeout=60)
        time.sleep(0.5)
    assert final["phase"] == "promoted", final
    assert not load.failures, load.failures[:3]
    assert {"1", "2"} <= set(load.versions()), load.versions()
    assert all(y == 2 * x for _, x, y in load.answers)
    assert default_version(served) == "2"


def test_a_failing_candidate_is_rolled_back_within_one_step(served: ServerProcess) -> None:
    with Load(served.url) as load:
        rollout(served, "start", "lin", "--version", "3", "--strategy", "canary",
                "--steps", "30,100", "--step-interval", "5s", "--min-requests", "20",
                "--max-error-rate", "0.05")  # fmt: skip
        started = time.monotonic()
        final = wait_phase(served, ("promoted", "rolled_back"), timeout=30)
        took = time.monotonic() - started
        time.sleep(0.5)
    assert final["phase"] == "rolled_back", final
    assert "error_rate" in str(final["reason"]), final["reason"]
    assert took < 5 + 3, took  # within one step interval (plus the CLI's polling)
    # Failures only where the candidate answered: every one is its injected failure.
    assert load.failures and all("injected candidate failure" in m for _, _, m in load.failures)
    assert set(load.versions()) <= {"2", "3"}
    assert len(load.answers) + len(load.failures) == load.sent  # each answered exactly once
    assert default_version(served) == "2"


def test_a_slower_candidate_is_rolled_back_on_the_p99_gate(served: ServerProcess) -> None:
    with Load(served.url):
        rollout(served, "start", "lin", "--version", "4", "--strategy", "canary",
                "--steps", "50,100", "--step-interval", "4s", "--min-requests", "20",
                "--max-p99-ms", "30")  # fmt: skip
        final = wait_phase(served, ("promoted", "rolled_back"), timeout=30)
    assert final["phase"] == "rolled_back", final
    assert "p99" in str(final["reason"]), final["reason"]


def test_changed_outputs_are_reported_in_shadow_and_blocked_in_canary(
    served: ServerProcess,
) -> None:
    with Load(served.url) as load:
        rollout(served, "start", "lin", "--version", "5", "--strategy", "shadow",
                "--shadow-fraction", "0.5", "--step-interval", "2s",
                "--min-requests", "10")  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # comparisons queue behind callers: on a busy machine they come later
            shadow = status(served)
            windows = shadow["windows"]
            assert isinstance(windows, dict)
            if windows.get("5", {}).get("compared", 0) > 0:
                break
            assert time.monotonic() < deadline, shadow
            time.sleep(0.5)
        rollout(served, "rollback", "lin")
    assert shadow["phase"] == "progressing"
    windows = shadow["windows"]
    assert isinstance(windows, dict)
    assert windows["5"]["compared"] > 0 and float(windows["5"]["max_divergence"]) > 0.5
    assert set(load.versions()) == {"2"}  # shadow never answers callers
    assert not load.failures

    with Load(served.url):
        rollout(served, "start", "lin", "--version", "5", "--strategy", "canary",
                "--steps", "20,100", "--step-interval", "4s", "--min-requests", "10",
                "--shadow-fraction", "1", "--max-divergence", "0.1")  # fmt: skip
        final = wait_phase(served, ("promoted", "rolled_back"), timeout=30)
    assert final["phase"] == "rolled_back", final
    assert "divergence" in str(final["reason"]), final["reason"]
    assert default_version(served) == "2"


def test_ab_keys_stick_and_weights_move_only_the_margin(served: ServerProcess) -> None:
    rollout(served, "start", "lin", "--version", "1", "--strategy", "ab", "--steps", "50",
            "--salt", "exp-1", "--step-interval", "60s")  # fmt: skip
    client = grpcclient.InferenceServerClient(served.url)
    tensor = grpcclient.InferInput("X", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))

    def arm(key: str, header: bool = False) -> str:
        if header:
            result = client.infer("lin", [tensor], headers={"convoy-ab-key": key})
        else:
            result = client.infer("lin", [tensor], parameters={"convoy-ab-key": key})
        return str(result.get_response().model_version)

    keys = [f"user-{i}" for i in range(400)]
    first = {k: arm(k) for k in keys}
    assert all(arm(k) == first[k] for k in keys[:100])  # sticky
    assert all(arm(k, header=True) == first[k] for k in keys[:50])  # header: the same key
    share = sum(v == "1" for v in first.values()) / len(keys)
    assert 0.4 < share < 0.6, share
    rollout(served, "weight", "lin", "60")
    second = {k: arm(k) for k in keys}
    moved = sum(first[k] != second[k] for k in keys) / len(keys)
    assert 0.03 < moved < 0.2, moved  # about 10%: only keys at the margin move
    assert all(second[k] == "1" for k in keys if first[k] == "1")  # only towards the candidate
    client.close()
    rollout(served, "rollback", "lin")


def test_blue_green_switch_and_rollback_lose_nothing(served: ServerProcess) -> None:
    with Load(served.url) as load:
        time.sleep(0.3)
        rollout(served, "start", "lin", "--version", "1", "--strategy", "blue-green",
                "--step-interval", "60s", "--min-requests", "10")  # fmt: skip
        time.sleep(1.5)
        switched = load.versions()
        rollout(served, "rollback", "lin")
        time.sleep(1.0)
    assert not load.failures, load.failures[:3]
    assert len(load.answers) == load.sent
    assert switched["1"] > 0 and switched["2"] > 0
    assert default_version(served) == "2"


def test_a_restart_mid_canary_resumes_it(tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo")
    server = start_server(repo)
    try:
        rollout(server, "start", "lin", "--version", "2", "--strategy", "canary",
                "--steps", "10,100", "--step-interval", "600s")  # fmt: skip
    finally:
        assert server.stop() == 0
    again = start_server(repo)
    try:
        resumed = status(again)
        assert resumed["phase"] == "progressing" and resumed["candidate"] == "2"
        assert resumed["weights"] == {"1": 90.0, "2": 10.0}
        versions = Counter(default_version(again) for _ in range(60))
        assert versions["1"] > versions["2"]  # never silently 100% of the candidate
    finally:
        again.stop()


def test_a_new_version_starts_the_declared_rollout_on_the_poll(tmp_path: Path) -> None:
    """rollout.json beside config.pbtxt: a version appearing on disk is rolled out by
    itself (--repository-poll-secs), never switched to all at once; a model without
    one keeps Triton's behaviour (its new version serves after the poll)."""
    repo = write_repository(tmp_path / "repo")
    config = repo / "lin" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("specific { versions: [ 1 ] }", "latest { num_versions: 1 }")
    )
    for version in ("2", "3", "4", "5", "9"):
        (repo / "lin" / version / "model.py").rename(tmp_path / f"model{version}.py")
        (repo / "lin" / version).rmdir()
    (repo / "lin" / "rollout.json").write_text(
        json.dumps({"strategy": "canary", "steps": [10, 100], "step_interval": "600s"})
    )
    plain = repo / "plain"
    (plain / "1").mkdir(parents=True)
    (plain / "1" / "model.py").write_text(VERSION_SOURCE.format(**VERSIONS[1]))
    (plain / "config.pbtxt").write_text(CONFIG.replace('"lin"', '"plain"').replace(
        "specific { versions: [ 1 ] }", "latest { num_versions: 1 }"))  # fmt: skip
    server = start_server(repo, "--repository-poll-secs", "0.5")
    try:
        assert default_version(server) == "1"
        for model in ("lin", "plain"):
            (repo / model / "2").mkdir()
            (repo / model / "2" / "model.py").write_text(VERSION_SOURCE.format(**VERSIONS[2]))
        started = wait_phase(server, ("progressing",), timeout=30)
        assert started["candidate"] == "2" and started["stable"] == "1"
        assert started["weights"] == {"1": 90.0, "2": 10.0}
        client = grpcclient.InferenceServerClient(server.url)
        deadline = time.monotonic() + 30
        while client.get_model_metadata("plain", as_json=True)["versions"] != ["2"]:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        client.close()
    finally:
        server.stop()


def test_an_unwritable_state_dir_is_refused_at_start_up(tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo")
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "state"  # under a file: no one can create it
    try:
        result = subprocess.run(
            [sys.executable, "-m", "convoy.cli", "serve", "--model-repository", str(repo),
             "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "-1",
             "--metrics-port", "-1", "--rollout-state-dir", str(unwritable)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the server started with an unwritable --rollout-state-dir")
    assert result.returncode == 2, result.stderr
    assert f"{unwritable}: --rollout-state-dir:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_start_that_cannot_be_saved_is_refused_over_grpc(tmp_path: Path) -> None:
    """The state directory breaks after start-up (here: replaced by a file): Start is
    refused with UNAVAILABLE naming it, and serving is as it was; fixed, Start works."""
    repo = write_repository(tmp_path / "repo")
    state = tmp_path / "state"
    state.mkdir()
    server = start_server(repo, "--rollout-state-dir", str(state))
    try:
        state.rmdir()
        state.write_text("")
        args = ("start", "lin", "--version", "2", "--strategy", "canary", "--steps", "50,100")
        refused = rollout(server, *args, check=False)
        assert refused.returncode != 0, refused.stdout
        assert "UNAVAILABLE" in refused.stderr and str(state) in refused.stderr, refused.stderr
        assert status(server) == {}
        assert {default_version(server) for _ in range(20)} == {"1"}
        state.unlink()
        rollout(server, *args)
        assert status(server)["phase"] == "progressing"
        assert (state / "lin.rollout.json").is_file()
    finally:
        server.stop()


def test_a_candidate_whose_directory_vanishes_is_rolled_back_at_once(tmp_path: Path) -> None:
    """The candidate's version directory is removed mid-canary: at the reload (here the
    poll) its share goes back to stable in the same step, no caller sees NOT_FOUND, and
    the rollout is rolled back naming why."""
    repo = write_repository(tmp_path / "repo")
    server = start_server(repo, "--repository-poll-secs", "0.5")
    try:
        with Load(server.url) as load:
            rollout(server, "start", "lin", "--version", "2", "--strategy", "canary",
                    "--steps", "50,100", "--step-interval", "600s")  # fmt: skip
            time.sleep(1.0)
            assert load.versions()["2"] > 0
            (repo / "lin" / "2").rename(tmp_path / "gone")
            final = wait_phase(server, ("rolled_back",), timeout=30)
            answered = len(load.answers)
            time.sleep(1.0)
            after = Counter(v for v, _, _ in load.answers[answered:])
        assert "candidate version 2 no longer serves" in str(final["reason"]), final
        assert not load.failures, load.failures[:3]
        assert set(after) == {"1"}, after
        assert default_version(server) == "1"
    finally:
        server.stop()
