"""Side by side, one command, one machine: Convoy against real Triton, Ray Serve,
LitServe and two ceilings.

    python -m loadtests.compare --duration 10 --concurrency 1,8,32 \\
        --out compare.md --csv compare.csv --json compare.json --plot compare.png

Every server serves the same model function, y = 2x + 1 over FP32 [16] with
dynamic batching: Convoy as a convoy_python model, Triton through the
`nvidia-pytriton` wheel (its tritonserver binary runs on the CPU; needs Python
3.12), Ray Serve with @serve.batch, LitServe with batching. Ceilings: a bare
grpc.aio echo server (the Python gRPC limit) and the function called in a loop
(the compute limit). Convoy, Triton and the echo share one client (KServe v2
gRPC, the same pre-serialised request); Ray Serve and LitServe speak HTTP JSON,
measured by the same closed loop over HTTP/1.1 keep-alive. Peers run one at a
time, each in its own virtual environment under ~/.cache/convoy/peers, created
on first use (pip, from PyPI). Prints a markdown table of ratios.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import bench

PEER_DIR = Path(__file__).resolve().parent / "peers"
ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = """
class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] * 2.0 + 1.0}
"""
TINY_CONFIG = """
name: "tiny"
backend: "convoy_python"
max_batch_size: 256
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
HTTP_BODY = json.dumps({"data": [[float(i) for i in range(16)]]}).encode()


@dataclass(frozen=True)
class Peer:
    name: str
    protocol: str  # grpc | http
    packages: tuple[str, ...] = ()  # its own venv when non-empty
    python: str = "3.11"
    script: str = ""
    args: tuple[str, ...] = field(default=())


PEERS = {
    "convoy": Peer("convoy", "grpc"),
    "triton": Peer("triton", "grpc", ("nvidia-pytriton==0.7.0",), "3.12", "pytriton_tiny.py"),
    "ray_serve": Peer("ray_serve", "http", ("ray[serve]==2.60.0",), "3.11", "ray_serve_tiny.py"),
    "litserve": Peer("litserve", "http", ("litserve==0.2.19",), "3.11", "litserve_tiny.py"),
    "echo": Peer("echo", "grpc"),
}


def find_python(version: str) -> str:
    pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")
    candidates = [shutil.which(f"python{version}"), *sorted(glob.glob(pattern))]
    for candidate in candidates:
        if (
            candidate
            and subprocess.run([candidate, "-c", "1"], capture_output=True).returncode == 0
        ):
            return candidate
    raise RuntimeError(f"Python {version} is needed for this peer and was not found")


def ensure_venv(peer: Peer) -> Path:
    home = Path(os.environ.get("CONVOY_CACHE_DIR", os.path.expanduser("~/.cache/convoy")))
    venv = home / "peers" / peer.name
    marker = venv / ".installed"
    wanted = " ".join(peer.packages)
    if marker.exists() and marker.read_text() == wanted:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    python = find_python(peer.python)
    print(f"creating the {peer.name} environment ({wanted}) ...", flush=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "numpy", *peer.packages], check=True
    )
    marker.write_text(wanted)
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_peer(peer: Peer, port: int, repo: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if peer.name == "convoy":
        cmd = [sys.executable, "-m", "convoy.cli", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "-1",
               "--log-level", "WARNING"]  # fmt: skip
    elif peer.name == "echo":
        cmd = [sys.executable, "-m", "loadtests.echo_server", "--port", str(port)]
    else:
        venv = ensure_venv(peer)
        python = venv / "bin" / "python"
        libdir = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        # Triton's python-backend stub links libpython.
        env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
        cmd = [str(python), str(PEER_DIR / peer.script), str(port)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def wait_ready(peer: Peer, url: str, payload: bytes, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if peer.protocol == "http":
                request = urllib.request.Request(
                    url, data=HTTP_BODY, headers={"Content-Type": "application/json"}
                )
                urllib.request.urlopen(request, timeout=5).read()
            else:
                import grpc

                with grpc.insecure_channel(url) as channel:
                    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                    call(payload, timeout=5)
            return
        except Exception:
            time.sleep(1.0)
    raise RuntimeError(f"{peer.name} did not become ready at {url}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def grpc_payload() -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.arange(16, dtype=np.float32).tobytes())
    return request.SerializeToString()


def bare_function(duration: float) -> float:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        _ = x * 2.0 + 1.0
        count += 1
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--csv", type=Path, default=None, help="every point as CSV")
    parser.add_argument("--json", type=Path, default=None, help="every point as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="latency-throughput PNG")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    payload = grpc_payload()
    results: dict[str, dict[int, bench.Result]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "tiny" / "1").mkdir(parents=True)
        (repo / "tiny" / "1" / "model.py").write_text(TINY_MODEL)
        (repo / "tiny" / "config.pbtxt").write_text(TINY_CONFIG)
        for name in args.peers.split(","):
            peer = PEERS[name]
            if peer.packages:
                ensure_venv(peer)  # before the clock starts
            port = free_port()
            proc = start_peer(peer, port, repo)
            url = (
                f"http://127.0.0.1:{port}/predict"
                if peer.protocol == "http"
                else f"127.0.0.1:{port}"
            )
            try:
                wait_ready(peer, url, payload)
                results[name] = {}
                for c in levels:
                    if peer.protocol == "http":
                        r = bench.run_http_closed_loop(
                            url, HTTP_BODY, name, c, args.duration, args.procs
                        )
                    else:
                        r = bench.run_closed_loop(
                            url, "tiny", c, args.duration, args.procs, payload=payload
                        )
                        r.model = name
                    print(r.line(), flush=True)
                    results[name][c] = r
            except RuntimeError as exc:
                print(f"{name}: skipped: {exc}", flush=True)
            finally:
                stop(proc)
    compute = bare_function(2.0)
    report = render(args, levels, results, compute)
    print(report)
    if args.out:
        args.out.write_text(report)
    points = [r for by_level in results.values() for r in by_level.values()]
    if points and args.csv:
        bench.write_csv(points, str(args.csv))
    if points and args.json:
        args.json.write_text(json.dumps([asdict(r) for r in points], indent=2))
    if points and args.plot:
        bench.plot(points, str(args.plot), "y = 2x + 1, closed loop: latency against throughput")


def render(
    args: argparse.Namespace, levels: list[int], results: dict[str, dict[int, bench.Result]],
    compute: float,
) -> str:  # fmt: skip
    lines = [
        f"## Side by side, {datetime.date.today().isoformat()}",
        "",
        f"`python -m loadtests.compare --duration {args.duration:g} --concurrency "
        f"{args.concurrency}` on {platform.machine()}, {os.cpu_count()} cores; "
        f"{args.procs} client processes on the same machine. Model: y = 2x + 1, FP32 [16].",
        "",
        "| server | " + " | ".join(f"c={c} req/s (p99 ms)" for c in levels)
        + " | Convoy / it at max c |",
        "| --- | " + " | ".join("---" for _ in levels) + " | --- |",
    ]  # fmt: skip
    top = max(levels)
    convoy = results.get("convoy", {}).get(top)
    for name, by_level in results.items():
        cells = [
            f"{by_level[c].throughput_rps:.0f} ({by_level[c].p99_ms:.1f})"
            + (f", {by_level[c].errors} errors" if by_level[c].errors else "")
            for c in levels
        ]
        ratio = (
            f"{convoy.throughput_rps / by_level[top].throughput_rps:.2f}"
            if convoy and by_level[top].throughput_rps
            else "-"
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("")
    lines.append(f"Compute ceiling: the function alone runs {compute:,.0f} times/s at batch 1.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
