"""Dockerfile.gpu cannot be built here (no Docker engine): check its structure."""

from __future__ import annotations

import re

from .conftest import ROOT

TEXT = (ROOT / "Dockerfile.gpu").read_text()
INSTRUCTIONS = [
    line.split()[0]
    for line in re.sub(r"\\\n", " ", TEXT).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def test_multi_stage_on_an_nvidia_base() -> None:
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", TEXT, flags=re.M)
    assert [name for _, name in stages] == ["builder", "runtime"]
    assert re.search(r"^ARG CUDA_IMAGE=nvcr\.io/nvidia/(tensorrt|cuda)", TEXT, flags=re.M)
    assert "COPY --from=builder" in TEXT


def test_installs_the_gpu_extra_and_runs_unprivileged() -> None:
    assert "[gpu]" in TEXT
    users = re.findall(r"^USER\s+(\S+)", TEXT, flags=re.M)
    assert users and users[-1] not in ("root", "0")


def test_ports_health_volume_entrypoint() -> None:
    assert re.search(r"^EXPOSE 8001 8002$", TEXT, flags=re.M)
    assert "HEALTHCHECK" in INSTRUCTIONS and "grpc.health" in TEXT.replace(
        "grpc_health", "grpc.health"
    )
    assert re.search(r'^VOLUME \["/models"\]', TEXT, flags=re.M)
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", TEXT, flags=re.M)
    assert entry and '"convoy", "serve"' in entry.group(1) and "/models" in entry.group(1)


def test_every_copied_path_exists() -> None:
    for line in TEXT.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_gpu_extra_declared() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    gpu = re.search(r"^gpu = \[(.*?)\]", pyproject, flags=re.M | re.S)
    assert gpu and "tensorrt" in gpu.group(1) and "cuda-python" in gpu.group(1)
