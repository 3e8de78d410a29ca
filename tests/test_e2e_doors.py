"""The same scenarios through every door, with the same outcomes (DESIGN §11): gRPC to one
process, HTTP/REST to the same process, and gRPC through `--frontends 2`. Each door hands
its requests to the one inference path, so rollout routing (canary weights, sticky A/B,
shadow comparison), ensembles under a rollout, the response cache and the rate budget
behave alike whatever the door.

The model `lin` answers y = 2x (version 1) or y = 3x (version 2): the factor says which
version computed an answer, also inside the ensemble `ens`, whose one step runs `lin`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from convoy.pb import convoy_admin_pb2 as admin
from convoy.pb import convoy_admin_pb2_grpc as admin_grpc
from convoy.rollouts.policy import AB_KEY_HEADER

from .conftest import ServerProcess, start_server
from .linear import linear_source, write_linear_model

pytestmark = pytest.mark.e2e

ENSEMBLE = """
name: "ens"
platform: "ensemble"
max_batch_size: 1
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
ensemble_scheduling {
  step [ { model_name: "lin" model_version: -1
           input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } } ]
}
"""
FACTOR_VERSION = {2.0: "1", 3.0: "2"}


def write_repository(root: Path) -> Path:
    one_instance = "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    for name, extra in (("lin", ""), ("cached", "response_cache { enable: true }\n")):
        versions = {1: linear_source(2), 2: linear_source(3)}
        write_linear_model(root, name, versions, max_batch_size=1, extra=one_instance + extra)
    (root / "ens" / "1").mkdir(parents=True)
    (root / "ens" / "config.pbtxt").write_text(ENSEMBLE)
    return root


class Refused(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Door:
    """One way in: infer(model, x, key) -> the version whose factor computed y."""

    name: str
    server: ServerProcess
    infer_raw: Callable[[str, float, str | None], float]

    def infer(self, model: str, x: float, key: str | None = None) -> str:
        y = self.infer_raw(model, x, key)
        return FACTOR_VERSION[round(y / x, 3)]


def grpc_door(name: str, server: ServerProcess, channels: int = 1) -> Door:
    # Several channels: several connections, spread over the front ends by the kernel.
    clients = [grpcclient.InferenceServerClient(server.url) for _ in range(channels)]
    turn = iter(range(1 << 30))

    def infer(model: str, x: float, key: str | None) -> float:
        tensor = grpcclient.InferInput("X" if model != "ens" else "IN", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.full((1, 1), x, np.float32))
        client = clients[next(turn) % len(clients)]
        try:
            result = client.infer(model, [tensor], headers={AB_KEY_HEADER: key} if key else None)
        except InferenceServerException as exc:
            raise Refused(str(exc.status())) from None
        return float(result.as_numpy("Y" if model != "ens" else "OUT")[0, 0])

    return Door(name, server, infer)


def http_door(server: ServerProcess) -> Door:
    client = httpclient.InferenceServerClient(server.http_url)

    def infer(model: str, x: float, key: str | None) -> float:
        tensor = httpclient.InferInput("X" if model != "ens" else "IN", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.full((1, 1), x, np.float32), binary_data=False)
        try:
            result = client.infer(model, [tensor], headers={AB_KEY_HEADER: key} if key else None)
        except InferenceServerException as exc:
            raise Refused(str(exc.status())) from None
        return float(result.as_numpy("Y" if model != "ens" else "OUT")[0, 0])

    return Door("http", server, infer)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("doors"))


CACHE = ("--cache-config", "local,size=1048576")


@pytest.fixture(scope="module")
def single(repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(repo, "--frontends", "1", *CACHE)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fronted(repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(repo, "--frontends", "2", *CACHE)
    yield proc
    proc.stop()


DOORS = ("grpc", "http", "frontends")


@pytest.fixture(params=DOORS)
def door(request: pytest.FixtureRequest) -> Door:
    if request.param == "grpc":
        return grpc_door("grpc", request.getfixturevalue("single"))
    if request.param == "http":
        return http_door(request.getfixturevalue("single"))
    return grpc_door("frontends", request.getfixturevalue("fronted"), channels=4)


class Rollouts:
    def __init__(self, server: ServerProcess) -> None:
        self._channel = grpc.insecure_channel(server.url)
        self._stub = admin_grpc.RolloutServiceStub(self._channel)
        self.started = False

    def start(self, strategy: str, *steps: float, shadow_fraction: float | None = None) -> None:
        """Version 2 of lin; no step advances or gate decides while a test runs."""
        spec = admin.RolloutSpec(strategy=strategy, steps=list(steps), step_interval_s=600)
        if shadow_fraction is not None:
            spec.shadow_fraction = shadow_fraction
        spec.gates.min_requests = 1_000_000
        self._stub.Start(admin.StartRolloutRequest(model="lin", version="2", spec=spec))
        self.started = True

    def status(self) -> admin.RolloutStatus:
        (status,) = self._stub.Status(admin.RolloutStatusRequest(model="lin")).rollouts
        return status

    def close(self) -> None:
        """Roll back what the test started: the next one starts from version 1."""
        if self.started:
            self._stub.Rollback(admin.RolloutModelRequest(model="lin"))
        self._channel.close()


@pytest.fixture()
def rollouts(door: Door) -> Iterator[Rollouts]:
    control = Rollouts(door.server)
    yield control
    control.close()


def test_canary_weights_and_an_ensemble_under_the_rollout(door: Door, rollouts: Rollouts) -> None:
    assert door.infer("lin", 5.0) == "1"
    rollouts.start("canary", 50, 100)
    direct = Counter(door.infer("lin", float(i + 1)) for i in range(60))
    counted = rollouts.status().windows["2"].requests
    through_ensemble = Counter(door.infer("ens", float(i + 1)) for i in range(60))
    # The ensemble's steps follow the step model's rollout, and count in its windows.
    assert set(direct) == {"1", "2"} and 10 <= direct["2"] <= 50, direct
    assert set(through_ensemble) == {"1", "2"} and 10 <= through_ensemble["2"] <= 50
    after = rollouts.status().windows["2"].requests
    assert after - counted == through_ensemble["2"], (counted, after, through_ensemble)


def test_ab_keys_stick_to_their_version_through_the_ensemble_too(
    door: Door, rollouts: Rollouts
) -> None:
    rollouts.start("ab", 50)
    keys = [f"user-{i}" for i in range(24)]
    seen = {key: {door.infer("lin", 1.0 + i, key) for i in range(3)} for key in keys}
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assigned = {key: versions.pop() for key, versions in seen.items()}
    assert set(assigned.values()) == {"1", "2"}, assigned
    assert {key: door.infer("ens", 7.0, key) for key in keys} == assigned


def test_shadow_compares_without_answering_callers(door: Door, rollouts: Rollouts) -> None:
    rollouts.start("shadow", shadow_fraction=1.0)
    assert {door.infer("lin", float(i + 1)) for i in range(20)} == {"1"}
    deadline = time.monotonic() + 30
    while (window := rollouts.status().windows["2"]).compared == 0:
        assert time.monotonic() < deadline, "no shadow comparison within 30 s"
        time.sleep(0.2)
    assert window.max_divergence > 0.5  # 3x against 2x


def test_a_repeated_request_is_a_cache_hit(door: Door) -> None:
    """Counted in Triton's statistics as read through the same door (HTTP's too)."""

    def hits() -> int:
        if door.name == "http":
            client: Any = httpclient.InferenceServerClient(door.server.http_url)
            stats = client.get_inference_statistics("cached", "1")
        else:
            client = grpcclient.InferenceServerClient(door.server.url)
            stats = client.get_inference_statistics("cached", "1", as_json=True)
        client.close()
        return int(stats["model_stats"][0]["inference_stats"]["cache_hit"].get("count", 0))

    x = float(1000 + DOORS.index(door.name))  # a value no other door sent
    before = hits()
    assert [door.infer("cached", x) for _ in range(3)] == ["1", "1", "1"]
    assert hits() - before == 2


# -- one rate budget per client for the whole server ---------------------------------------

RATE, BURST = 1.0, 8


@pytest.fixture(scope="module")
def limited(repo: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    args = ("--rate-limit", str(RATE), "--rate-burst", str(BURST))
    one = start_server(repo, "--frontends", "1", *args)
    two = start_server(repo, "--frontends", "2", *args)
    yield one, two
    one.stop()
    two.stop()


@pytest.mark.parametrize("doors", ["grpc", "http", "frontends", "every door of the fronted"])
def test_the_rate_budget_is_one_per_client(
    limited: tuple[ServerProcess, ServerProcess], doors: str
) -> None:
    """A burst of calls from one client: `--rate-burst` of them are let in in all (plus what
    the rate refills meanwhile), never that many per front-end process or per protocol."""
    one, two = limited
    if doors == "grpc":
        ways = [grpc_door("grpc", one)]
    elif doors == "http":
        ways = [http_door(one)]
    elif doors == "frontends":
        ways = [grpc_door("frontends", two, channels=6)]
    else:
        ways = [grpc_door("frontends", two, channels=6), http_door(two)]
    time.sleep(BURST / RATE)  # a full bucket, whatever the test before spent
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    for i in range(3 * BURST):
        try:
            ways[i % len(ways)].infer("lin", 1.0)
            outcomes["ok"] += 1
        except Refused as exc:
            outcomes[exc.status] += 1
    refilled = RATE * (time.monotonic() - started)
    assert BURST <= outcomes["ok"] <= BURST + refilled + 1, outcomes
    refused = set(outcomes) - {"ok"}
    assert refused <= {"StatusCode.RESOURCE_EXHAUSTED", "429"}, outcomes
    assert refused, outcomes
