"""Shared fixtures: the example repository and a real server in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.repository.examples import default_examples_dir, ensure_examples
from server.scheduling.devices import cuda_device_count

# Without a GPU, OpenAI Triton kernels run in Triton's interpreter on CPU tensors;
# it must be chosen before triton is first imported.
if cuda_device_count() == 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
_READY = re.compile(r"convoy serving gRPC on \S+:(\d+), metrics on port (\d+|off)")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """The built-in examples, built once per machine (cached like `convoy serve` does)."""
    return ensure_examples(default_examples_dir())


def make_repository(target: Path, examples: Path, models: tuple[str, ...] = ()) -> Path:
    """A private repository: config copied, big model files linked, not copied."""
    target.mkdir(parents=True, exist_ok=True)
    for model in models or tuple(p.name for p in examples.iterdir() if p.is_dir()):
        src = examples / model
        dst = target / model
        dst.mkdir()
        shutil.copy(src / "config.pbtxt", dst / "config.pbtxt")
        for version in (p for p in src.iterdir() if p.is_dir()):
            (dst / version.name).mkdir()
            for f in version.iterdir():
                (dst / version.name / f.name).symlink_to(f)
    return target


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int | None
    repository: Path | None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return "".join(self.log)


def start_server(
    repository: Path | None,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> ServerProcess:
    """Start `convoy serve` on free ports; None serves the built-in examples."""
    cmd = [
        sys.executable, "-m", "server.cli", "serve",
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        *extra,
    ]  # fmt: skip
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    found: list[re.Match[str]] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            match = _READY.search(line)
            if match and not found:
                found.append(match)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(lines))
    if not found:
        raise RuntimeError("server exited during start-up:\n" + "".join(lines))
    metrics = found[0].group(2)
    return ServerProcess(
        proc=proc,
        grpc_port=int(found[0].group(1)),
        metrics_port=None if metrics == "off" else int(metrics),
        repository=repository,
        log=lines,
    )


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
