"""Start `convoy serve` in a subprocess on free ports and wait until it serves.

Shared by the tests, the soak run and the batching benchmark. The server's
output is read by a thread for its whole life (so it never blocks on a full
pipe) and kept in `log`.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from convoy.procstat import process_usage

ROOT = Path(__file__).resolve().parents[1]
_READY = re.compile(r"convoy serving gRPC on \S+:(\d+), metrics on port (\d+|off)")
_HTTP = re.compile(r"HTTP on port (\d+|off)")


@dataclass
class ConvoyProcess:
    proc: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int | None
    repository: Path | None
    log: list[str] = field(default_factory=list)
    http_port: int | None = None  # None: HTTP off

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return "".join(self.log)


def start_convoy(
    repository: Path | None,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> ConvoyProcess:
    """Start `convoy serve` on free ports; None serves the built-in examples."""
    cmd = [
        sys.executable, "-m", "convoy.cli", "serve",
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
        *extra,
    ]  # fmt: skip
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    # PYTHONFAULTHANDLER: a server that hangs during start-up is sent SIGABRT, and
    # prints every thread's stack before it dies (below), for the error to show.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
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

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            _abort(proc, reader)
            raise RuntimeError(
                f"server did not start in {timeout:.0f} s (its threads' stacks at the end):\n"
                + "".join(lines)
            )
    if not found:
        raise RuntimeError("server exited during start-up:\n" + "".join(lines))
    metrics = found[0].group(2)
    http = _HTTP.search(found[0].string)
    return ConvoyProcess(
        proc=proc,
        grpc_port=int(found[0].group(1)),
        metrics_port=None if metrics == "off" else int(metrics),
        repository=repository,
        log=lines,
        http_port=int(http.group(1)) if http and http.group(1) != "off" else None,
    )


def _abort(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    """Stop a server that hangs during start-up so that it says where: SIGABRT makes
    faulthandler print every thread's stack; SIGKILL if it is still there after. (Only
    the engine's stacks: a front end it started is left to notice the engine gone.)"""
    with contextlib.suppress(OSError):  # no core file of the server where cores are on
        resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
    proc.send_signal(signal.SIGABRT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=5)  # the rest of its output


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU of a process, all its threads (or with `tid`, that one thread):
    what a server spends per request, robust to how busy a shared machine is. Raises
    FileNotFoundError for a process that has gone."""
    usage = process_usage(pid, tid)
    if usage is None:
        raise FileNotFoundError(f"/proc/{pid}: no such process")
    return usage[0]


def link_model(source: Path, target: Path) -> None:
    """A model directory of its own (the repository refuses directories that resolve
    elsewhere): its config copied, its version files linked, not copied."""
    target.mkdir(parents=True)
    shutil.copy(source / "config.pbtxt", target / "config.pbtxt")
    for version in (p for p in source.iterdir() if p.is_dir()):
        (target / version.name).mkdir()
        for item in version.iterdir():
            (target / version.name / item.name).symlink_to(item)
