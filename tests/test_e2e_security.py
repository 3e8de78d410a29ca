"""TLS, mutual TLS, bearer tokens and rate limits, through the stock tritonclient."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from convoy.api.auth import AccessPolicy
from convoy.errors import RateLimited
from convoy.inference.admission import RateBudget

from .certs import make_pki
from .conftest import make_repository, start_server

pytestmark = pytest.mark.e2e


def tiny_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    return tensor


@pytest.fixture(scope="module")
def tiny_repo(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("secure"), examples_dir, ("tiny",))


def test_tls_and_mutual_tls(tiny_repo: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = start_server(
        tiny_repo,
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-ca", str(pki.ca),
    )  # fmt: skip
    url = f"localhost:{server.grpc_port}"
    try:
        good = grpcclient.InferenceServerClient(
            url,
            ssl=True,
            root_certificates=str(pki.ca),
            private_key=str(pki.client_key),
            certificate_chain=str(pki.client_cert),
        )
        out = good.infer("tiny", [tiny_input()]).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(out, np.full((1, 16), 3.0, np.float32))
        good.close()
        for kwargs in (
            {},  # plaintext against a TLS port
            {"ssl": True, "root_certificates": str(pki.ca)},  # TLS without a client cert
            {  # a client certificate from another CA
                "ssl": True,
                "root_certificates": str(pki.ca),
                "private_key": str(pki.rogue_key),
                "certificate_chain": str(pki.rogue_cert),
            },
        ):
            bad = grpcclient.InferenceServerClient(url, **kwargs)  # type: ignore[arg-type]
            with pytest.raises(InferenceServerException):
                bad.infer("tiny", [tiny_input()], client_timeout=5)
            bad.close()
    finally:
        server.stop()


def test_server_only_tls(tiny_repo: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = start_server(
        tiny_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)
    )
    try:
        client = grpcclient.InferenceServerClient(
            f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(pki.ca)
        )
        assert client.is_server_live()
        assert client.infer("tiny", [tiny_input()]).as_numpy("OUTPUT0").shape == (1, 16)
        client.close()
    finally:
        server.stop()


def test_bearer_tokens_and_roles(tiny_repo: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# token role\ns3cret-infer infer\ns3cret-admin admin\n")
    server = start_server(tiny_repo, "--auth-tokens", str(tokens))
    try:
        client = grpcclient.InferenceServerClient(server.url)
        # Probes need no credentials.
        assert client.is_server_live() and client.is_server_ready()
        with grpc.insecure_channel(server.url) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tiny_input()])
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tiny_input()], headers={"authorization": "Bearer wrong"})
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        infer = {"authorization": "Bearer s3cret-infer"}
        admin = {"authorization": "Bearer s3cret-admin"}
        assert client.infer("tiny", [tiny_input()], headers=infer).as_numpy("OUTPUT0") is not None
        assert client.get_model_metadata("tiny", headers=infer).name == "tiny"
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("tiny", headers=infer)
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "admin" in info.value.message()
        client.load_model("tiny", headers=admin)  # reload, as admin
        # Streams are guarded too.
        answers: list[object] = []
        client.start_stream(callback=lambda result, error: answers.append(error), headers=infer)
        client.async_stream_infer("tiny", [tiny_input()])
        client.stop_stream()
        assert answers == [None]
        client.close()
    finally:
        server.stop()


def test_rate_limit(tiny_repo: Path) -> None:
    server = start_server(tiny_repo, "--rate-limit", "5", "--rate-burst", "5")
    try:
        client = grpcclient.InferenceServerClient(server.url)
        outcomes = []
        for _ in range(20):
            try:
                client.infer("tiny", [tiny_input()])
                outcomes.append("ok")
            except InferenceServerException as exc:
                outcomes.append(exc.status())
        assert outcomes.count("ok") >= 5
        assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes
        assert client.is_server_live()  # probes are never rate limited
        client.close()
    finally:
        server.stop()


def test_policy_unit() -> None:
    """Tokens and roles at the door; the other RPCs charged to the one budget that the
    inference path charges inferences to (one per client, whatever the method)."""
    clock = [0.0]
    budget = RateBudget(1, 2, clock=lambda: clock[0])
    policy = AccessPolicy({"t": "infer"}, budget)
    infer = "/inference.GRPCInferenceService/ModelInfer"
    metadata = "/inference.GRPCInferenceService/ModelMetadata"
    auth = (("authorization", "Bearer t"),)
    assert policy.check(infer, auth) is None  # charged by the path, not here
    budget.admit(policy.client(auth))  # the path's charge for that inference
    assert policy.check(metadata, auth) is None
    denial = policy.check(metadata, auth)
    assert denial is not None and denial.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(RateLimited):
        budget.admit(policy.client(auth))
    other = policy.client((("authorization", "Bearer u"),))
    assert other != policy.client(auth)
    budget.admit(other)  # another client's bucket is its own, still full
    budget.admit(other)
    clock[0] += 1.0
    assert policy.check(metadata, auth) is None
    assert (
        policy.check(infer, (("authorization", "Basic t"),)).code == grpc.StatusCode.UNAUTHENTICATED
    )  # type: ignore[union-attr]


def test_a_rate_below_one_per_second_still_lets_requests_in() -> None:
    clock = [0.0]
    budget = RateBudget(0.5, clock=lambda: clock[0])
    budget.admit("c")  # the first: a full bucket holds one request
    with pytest.raises(RateLimited):
        budget.admit("c")
    clock[0] += 2.0  # one request every two seconds
    budget.admit("c")
