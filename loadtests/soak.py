"""Soak: mixed load with random reloads and injected faults, reconciled to the request.

    python -m loadtests.soak --duration 300 [--frontends 2] [--capture]

Starts its own `convoy serve` on a repository holding the built-in `tiny` model and
a `faulty` convoy_python model (loadtests/faulty_model.py: raises, runs out of
memory or hangs past its execution timeout on chosen inputs). Client threads send a bounded mix for
--duration seconds while another thread reloads models at random. Every request
sent must come back exactly once (a result or an error status), and the server's
own Prometheus counters must agree with what the clients saw. Reports memory
(RSS) over time. Exits non-zero if anything does not reconcile.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.repository.examples import default_examples_dir, ensure_examples

from . import faulty_model
from .launch import start_convoy

FAULTY_CONFIG = faulty_model.config(
    "faulty",
    "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
    'parameters { key: "execution_timeout_ms" value { string_value: "300" } }',
    instances=2,
)


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    wrong: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


CAPTURE_ALL = 'parameters { key: "capture_sample_rate" value { string_value: "1" } }\n'


def build_repository(root: Path, capture: bool = False) -> None:
    examples = ensure_examples(default_examples_dir())
    shutil.copytree(examples / "tiny", root / "tiny")
    (root / "faulty" / "1").mkdir(parents=True)
    (root / "faulty" / "1" / "model.py").write_text(faulty_model.SOURCE)
    (root / "faulty" / "config.pbtxt").write_text(FAULTY_CONFIG)
    if capture:
        for model in ("tiny", "faulty"):
            config = root / model / "config.pbtxt"
            config.write_text(config.read_text() + CAPTURE_ALL)


def captured_rows(capture: Path) -> Counter[str]:
    """Rows per model in the capture's complete Parquet files, as pyarrow reads them."""
    import pyarrow.dataset as ds

    files = ds.dataset(capture / "requests", partitioning="hive", format="parquet")
    models = files.to_table(columns=["model"]).column("model").to_pylist()
    return Counter(str(m) for m in models)


# A connection of each client's own (gRPC would share one between a process's channels):
# with front ends, the kernel spreads connections, not channels, over them.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def client_loop(url: str, stop: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    client = grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
    while time.monotonic() < stop:
        if rng.random() < 0.6:
            model, name, out = "tiny", "INPUT0", "OUTPUT0"
            x = np.full((1, 16), rng.randint(0, 100), np.float32)
            expect = x * 2 + 1
        else:
            model, name, out = "faulty", "X", "Y"
            value = rng.choice([1.0, 2.0, 3.0, -1.0, -3.0] + [-2.0] * (rng.random() < 0.02))
            x = np.full((1, 1), value, np.float32)
            expect = x
        tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with tally.lock:
            tally.sent[model] += 1
        try:
            result = client.infer(model, [tensor], client_timeout=60).as_numpy(out)
            with tally.lock:
                tally.ok[model] += 1
                tally.wrong += int(not np.array_equal(result, expect))
        except InferenceServerException as exc:
            with tally.lock:
                tally.errors[(model, str(exc.status()))] += 1
    client.close()


def reload_loop(url: str, stop: float, seed: int) -> int:
    rng = random.Random(seed)
    client = grpcclient.InferenceServerClient(url)
    reloads = 0
    while time.monotonic() < stop:
        time.sleep(rng.uniform(0.5, 2.0))
        client.load_model(rng.choice(["tiny", "faulty"]))
        reloads += 1
    client.close()
    return reloads


def server_counters(metrics_port: int) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Successes and failures per model, and ModelInfer calls per front end."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    success: Counter[str] = Counter()
    failure: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    for line in body.decode().splitlines():
        match = re.match(r"convoy_request_(success|failure)_total\{(.*)\} ([0-9.e+]+)", line)
        if match:
            model = re.search(r'model="([^"]+)"', match.group(2)).group(1)  # type: ignore[union-attr]
            target = success if match.group(1) == "success" else failure
            target[model] += int(float(match.group(3)))
        match = re.match(r'convoy_frontend_requests_total\{frontend="(\d+)"\} ([0-9.e+]+)', line)
        if match:
            passed[match.group(1)] += int(float(match.group(2)))
    return success, failure, passed


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(
    duration: float, clients: int, seed: int = 0, frontends: int = 1, capture: bool = False
) -> dict[str, object]:
    """With `frontends` > 1 every call also goes through a front end, and the calls each
    front end passed on must add up to what the clients sent. With `capture`, every
    request is captured (files rotated each second), and after SIGTERM the Parquet files
    must hold a row for each request the server answered."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        build_repository(root, capture)
        extra = []
        if capture:
            extra = ["--capture-dir", str(Path(tmp) / "capture"), "--capture-flush-secs", "1"]
        server = start_convoy(root, "--frontends", str(frontends), *extra)
        proc, url, metrics_port = server.proc, server.url, server.metrics_port
        assert metrics_port is not None
        tally = Tally()
        stop = time.monotonic() + duration
        memory: list[tuple[float, float]] = []
        threads = [
            threading.Thread(target=client_loop, args=(url, stop, tally, seed + i))
            for i in range(clients)
        ]
        reloads: list[int] = []
        threads.append(
            threading.Thread(target=lambda: reloads.append(reload_loop(url, stop, seed)))
        )
        began = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            memory.append((round(time.monotonic() - began, 1), rss_mb(proc.pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        success, failure, passed = server_counters(metrics_port)
        code = server.stop()
        captured = captured_rows(Path(tmp) / "capture") if capture else Counter()
    answered = {
        m: tally.ok[m] + sum(n for (mm, _), n in tally.errors.items() if mm == m)
        for m in tally.sent
    }
    lost = {m: tally.sent[m] - answered[m] for m in tally.sent}
    report: dict[str, object] = {
        "duration_s": duration,
        "clients": clients,
        "reloads": sum(reloads),
        "sent": dict(tally.sent),
        "ok": dict(tally.ok),
        "errors": {f"{m} {c}": n for (m, c), n in sorted(tally.errors.items())},
        "lost": lost,
        "wrong_results": tally.wrong,
        "server_success": dict(success),
        "server_failure": dict(failure),
        "frontends": frontends,
        "frontend_requests": dict(passed),
        "rss_mb": memory,
        "exit_code": code,
        "captured": dict(captured),
    }
    report["reconciled"] = (
        all(v == 0 for v in lost.values())
        and tally.wrong == 0
        and all(success[m] == tally.ok[m] for m in tally.sent)
        and all(
            failure[m] == sum(n for (mm, _), n in tally.errors.items() if mm == m)
            for m in tally.sent
        )
        and code == 0
        and (frontends == 1 or sum(passed.values()) == sum(tally.sent.values()))
        # Captured: what the server counted as answered by a model (success or failure).
        and (not capture or all(captured[m] == success[m] + failure[m] for m in tally.sent))
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--frontends", type=int, default=1, help="front-end processes")
    parser.add_argument(
        "--capture", action="store_true",
        help="capture every request; the Parquet rows must match what was answered",
    )  # fmt: skip
    args = parser.parse_args(argv)
    report = soak(args.duration, args.clients, frontends=args.frontends, capture=args.capture)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    sys.exit(0 if report["reconciled"] else 1)


if __name__ == "__main__":
    main()
