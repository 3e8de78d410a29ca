"""A rollout as callers and the server see it, second by second.

    python -m loadtests.rollout_timeline --candidate failing --rate 100 --duration-per-step 5
    python -m loadtests.rollout_timeline --shadow-overhead --rate 100 --duration-per-step 10

Builds a temporary repository with a convoy_python model `lin` (stable v1: y = 2x, and one
version per candidate: good y = 2x, failing raises on a fifth of requests, slow +50 ms,
diverging y = 3x), starts `convoy serve` on it, sends steady open-loop load of unversioned
requests with tritonclient, starts a canary of the candidate through the admin service and
prints, every poll, the rollout's phase, step, weights and per-version windows beside what
the callers got in that interval. Ends when the server promotes or rolls back by itself.

--shadow-overhead instead measures the callers' latency under the same load with no rollout,
with a shadow rollout at fraction 1.0 (every request also runs on the candidate), and with
none again, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.pb import convoy_admin_pb2 as pb
from convoy.pb import convoy_admin_pb2_grpc as pb_grpc
from convoy.rollouts.cli import add_rollout_parser, start_request, status_json

from .bench import Result, _summarise
from .launch import start_convoy

MODEL = "lin"
STABLE = "1"
MODEL_SOURCE = """
import time


class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        x = inputs["X"]
        if {fail} and (x.astype(int) % 5 == 0).any():
            raise RuntimeError("injected failure in version {version}")
        if {sleep}:
            time.sleep({sleep})
        return {{"Y": x * {factor}}}
"""
# version -> behaviour; x cycles over 1..1000, so `fail` hits exactly a fifth of requests.
VERSIONS: dict[str, dict[str, Any]] = {
    STABLE: dict(factor=2, fail=False, sleep=0.0),
    "2": dict(factor=2, fail=False, sleep=0.0),
    "3": dict(factor=2, fail=True, sleep=0.0),
    "4": dict(factor=2, fail=False, sleep=0.05),
    "5": dict(factor=3, fail=False, sleep=0.0),
}
CANDIDATES = {"good": "2", "failing": "3", "slow": "4", "diverging": "5"}
# max_batch_size 1: a failure costs exactly the request that hit it, so ~20% means 20%.
CONFIG = f"""
name: "{MODEL}"
backend: "convoy_python"
max_batch_size: 1
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
version_policy: {{ specific {{ versions: [ {STABLE} ] }} }}
"""
TERMINAL = ("promoted", "rolled_back")


def write_repository(root: Path) -> Path:
    for version, kind in VERSIONS.items():
        (root / MODEL / version).mkdir(parents=True)
        source = MODEL_SOURCE.format(version=version, **kind)
        (root / MODEL / version / "model.py").write_text(source)
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    return root


@dataclass(frozen=True)
class Outcome:
    scheduled: float  # monotonic s: latency counts from here, so queueing is not hidden
    done: float
    x: float
    version: str  # the answering version; "" on failure
    y: float
    failed_by: str  # the version named in the error ("?" if none); "" on success
    status: str


@dataclass
class OpenLoopLoad:
    """Poisson arrivals at `rate` req/s from a few sender threads, one client each.

    Sends with async_infer, so a slow answer never delays the next send; stops at
    `max_seconds` or `max_requests`, whichever comes first. Outstanding calls are capped
    per thread; an arrival past the cap is counted in `not_sent` instead of piling up.
    """

    url: str
    rate: float
    threads: int = 3
    max_seconds: float = 300.0
    max_requests: int = 200_000
    max_outstanding: int = 500
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0
    not_sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> OpenLoopLoad:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def since(self, cursor: int) -> tuple[list[Outcome], int]:
        """Outcomes completed after `cursor` (an index into the append-only list)."""
        with self._lock:
            return self.outcomes[cursor:], len(self.outcomes)

    def _run(self, seed: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        rng = np.random.default_rng(seed)
        per_thread = self.rate / self.threads
        outstanding = threading.Semaphore(self.max_outstanding)
        finished, drained = threading.Event(), threading.Event()
        in_flight = 0
        start = time.monotonic()
        next_at = start
        i = seed
        while not self._stop.is_set() and next_at < start + self.max_seconds:
            next_at += rng.exponential(1.0 / per_thread)
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            with self._lock:
                if self.sent + self.not_sent >= self.max_requests:
                    break
                if not outstanding.acquire(blocking=False):
                    self.not_sent += 1
                    continue
                self.sent += 1
                in_flight += 1
            i += self.threads
            x = float(i % 1000 + 1)
            tensor = grpcclient.InferInput("X", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1), x, np.float32))

            def done(
                result: Any, error: InferenceServerException | None, x: float = x,
                scheduled: float = next_at,
            ) -> None:  # fmt: skip
                nonlocal in_flight
                now = time.monotonic()
                if error is None:
                    version = str(result.get_response().model_version)
                    y = float(result.as_numpy("Y")[0, 0])
                    outcome = Outcome(scheduled, now, x, version, y, "", "OK")
                else:
                    by = _failed_by(error.message() or "")
                    outcome = Outcome(scheduled, now, x, "", 0.0, by, str(error.status()))
                with self._lock:
                    self.outcomes.append(outcome)
                    in_flight -= 1
                    if in_flight == 0 and finished.is_set():
                        drained.set()
                outstanding.release()

            client.async_infer(MODEL, [tensor], done, client_timeout=30)
        with self._lock:
            finished.set()
            if in_flight == 0:
                drained.set()
        drained.wait(35)  # every call sent comes back (answer, error or client timeout)
        client.close()


def _failed_by(message: str) -> str:
    # The injected failure names its version; a failed call carries no model_version.
    _, found, rest = message.partition("in version ")
    return rest.split()[0] if found and rest else "?"


class Admin:
    """convoy.admin.RolloutService, with requests built by the CLI's own parser."""

    def __init__(self, url: str) -> None:
        self._channel = grpc.insecure_channel(url)
        self._stub = pb_grpc.RolloutServiceStub(self._channel)
        parser = argparse.ArgumentParser(prog="convoy")
        add_rollout_parser(parser.add_subparsers(dest="command"))
        self._parser = parser

    def start(self, *argv: str) -> dict[str, Any]:
        args = self._parser.parse_args(["rollout", "start", MODEL, *argv])
        return status_json(self._stub.Start(start_request(args), timeout=120))

    def status(self) -> dict[str, Any]:
        reply = self._stub.Status(pb.RolloutStatusRequest(model=MODEL), timeout=10)
        return status_json(reply.rollouts[0]) if reply.rollouts else {}

    def rollback(self) -> dict[str, Any]:
        return status_json(self._stub.Rollback(pb.RolloutModelRequest(model=MODEL), timeout=60))

    def close(self) -> None:
        self._channel.close()


@dataclass
class Row:
    """One poll: the server's status and the callers' view since the previous poll."""

    elapsed_s: float
    phase: str
    step: int
    weights: dict[str, float]
    windows: dict[str, dict[str, Any]]
    answers: dict[str, int]  # version -> answered calls completed in the interval
    wrong: dict[str, int]  # version -> answers other than y = 2x
    failures: dict[str, int]  # version named in the error -> failed calls
    caller_p99_ms: float | None


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _window_cells(window: dict[str, Any] | None) -> str:
    w = window or {}
    return (
        f"{_fmt(w.get('requests'), 'd'):>5} {_fmt(w.get('error_rate'), '.3f'):>6} "
        f"{_fmt(w.get('compute_p99_ms')):>6} {_fmt(w.get('queue_p99_ms')):>6}"
    )


def header(candidate: str) -> str:
    v = f"v{STABLE} req  err    c99    q99"
    c = f"v{candidate} req  err    c99    q99    div  cmp"
    return (
        f"{'t s':>6} {'phase':<12} {'st':>2} {'weights':>9} | {v} | {c} |"
        f" callers v{STABLE:<3} v{candidate:<3} fail wrong  p99"
    )


def format_row(row: Row, candidate: str) -> str:
    weights = f"{row.weights.get(STABLE, 0):g}/{row.weights.get(candidate, 0):g}"
    cand = row.windows.get(candidate) or {}
    divergence = cand.get("max_divergence")
    return (
        f"{row.elapsed_s:6.1f} {row.phase:<12} {row.step:>2} {weights:>9} | "
        f"{_window_cells(row.windows.get(STABLE))} | {_window_cells(cand)} "
        f"{_fmt(divergence, '.3g'):>6} {_fmt(cand.get('compared'), 'd'):>4} | "
        f"        {row.answers.get(STABLE, 0):>4} {row.answers.get(candidate, 0):>4} "
        f"{sum(row.failures.values()):>4} {sum(row.wrong.values()):>5} "
        f"{_fmt(row.caller_p99_ms):>5}"
    )


def _callers_view(outcomes: list[Outcome]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    answers = Counter(o.version for o in outcomes if o.version)
    wrong = Counter(o.version for o in outcomes if o.version and o.y != 2 * o.x)
    failures = Counter(o.failed_by for o in outcomes if not o.version)
    return answers, wrong, failures


def _p99_ms(outcomes: list[Outcome]) -> float | None:
    if not outcomes:
        return None
    return _latency(outcomes).p99_ms


def _latency(outcomes: list[Outcome], seconds: float = 1.0, name: str = "") -> Result:
    """The bench's summary over the answered calls among `outcomes`."""
    latencies = [o.done - o.scheduled for o in outcomes if o.version]
    errors = sum(1 for o in outcomes if not o.version)
    return _summarise(name, 0, 1, latencies, errors, seconds, seconds, 0.0)


@dataclass
class Summary:
    candidate: str
    version: str
    phase: str
    reason: str
    decision_s: float | None  # from the Start RPC's return to the poll that saw the end
    sent: int
    answered: dict[str, int]
    failed: int
    failed_by: dict[str, int]  # the version named in each failure's message
    wrong: dict[str, int]
    caller_p50_ms: float
    caller_p99_ms: float
    not_sent: int
    unanswered: int  # sent but never back: should be 0 (every call ends exactly once)

    def lines(self) -> list[str]:
        decision = "-" if self.decision_s is None else f"{self.decision_s:.1f} s"
        by = ", ".join(f"v{v}: {n}" for v, n in sorted(self.failed_by.items())) or "none"
        answered = ", ".join(f"v{v}: {n}" for v, n in sorted(self.answered.items()))
        wrong = ", ".join(f"v{v}: {n}" for v, n in sorted(self.wrong.items())) or "none"
        return [
            f"summary: {self.candidate} candidate v{self.version}: {self.phase} after {decision}",
            f"  reason:  {self.reason}",
            f"  callers: {self.sent} sent, answered {answered}; "
            f"p50 {self.caller_p50_ms:.1f} ms, p99 {self.caller_p99_ms:.1f} ms",
            f"  failed:  {self.failed} calls (by version: {by}); wrong answers: {wrong}; "
            f"not sent (client cap): {self.not_sent}; unanswered: {self.unanswered}",
        ]


def canary_args(
    step_s: float, steps: str, min_requests: int, max_p99_ms: float = 30.0
) -> list[str]:
    """The gates every candidate faces; each bad candidate should break exactly one."""
    return [
        "--strategy", "canary", "--steps", steps, "--step-interval", f"{step_s}s",
        "--min-requests", str(min_requests), "--max-error-rate", "0.01",
        "--max-p99-ms", f"{max_p99_ms:g}", "--max-divergence", "0.01",
        "--shadow-fraction", "0.25",
    ]  # fmt: skip


def run_timeline(
    url: str, candidate: str, rate: float, step_s: float, steps: str, min_requests: int,
    max_seconds: float, poll_s: float = 0.5, max_p99_ms: float = 30.0,
    out: TextIO | None = None,
) -> tuple[list[Row], Summary]:  # fmt: skip
    """Canary of `candidate` under steady load on a running server; the timeline and summary."""
    out = out or sys.stdout  # looked up per call: pytest's capsys swaps sys.stdout
    version = CANDIDATES[candidate]
    admin = Admin(url)
    rows: list[Row] = []
    argv = ["--version", version, *canary_args(step_s, steps, min_requests, max_p99_ms)]
    print(f"convoy rollout start {MODEL} {' '.join(argv)}", file=out)
    # Load runs a little past max_seconds so the decision is always seen under traffic.
    with OpenLoopLoad(url, rate, max_seconds=max_seconds + 10) as load:
        time.sleep(1.0)  # stable only, before the rollout: a baseline in the first rows
        _, cursor = load.since(0)
        admin.start(*argv)
        started = time.monotonic()
        print(header(version), file=out, flush=True)
        last: dict[str, Any] = {}
        decision_s: float | None = None
        reason = ""
        while time.monotonic() - started < max_seconds:
            time.sleep(poll_s)
            status = admin.status()
            recent, cursor = load.since(cursor)
            answers, wrong, failures = _callers_view(recent)
            row = Row(
                elapsed_s=time.monotonic() - started, phase=status["phase"], step=status["step"],
                weights=status["weights"], windows=status["windows"], answers=dict(answers),
                wrong=dict(wrong), failures=dict(failures), caller_p99_ms=_p99_ms(recent),
            )  # fmt: skip
            rows.append(row)
            print(format_row(row, version), file=out, flush=True)
            if status["reason"] != reason:
                reason = status["reason"]
                print(f"       reason: {reason}", file=out)
            if status.get("analysis") and status["analysis"] != last.get("analysis"):
                print(f"       analysis: {status['analysis']}", file=out)
            last = status
            if status["phase"] in TERMINAL:
                decision_s = row.elapsed_s
                break
        time.sleep(1.0)  # callers just after the decision: they should be on one version
        recent, cursor = load.since(cursor)
    answers, wrong, failures = _callers_view(recent)
    print(
        f"  1 s after: callers answered by {dict(sorted(answers.items()))}, "
        f"failed {sum(failures.values())}, wrong {sum(wrong.values())}",
        file=out,
    )
    admin.close()
    answers, wrong, failures = _callers_view(load.outcomes)
    latency = _latency(load.outcomes)
    summary = Summary(
        candidate=candidate, version=version, phase=last.get("phase", ""), reason=reason,
        decision_s=decision_s, sent=load.sent, answered=dict(answers),
        failed=sum(failures.values()), failed_by=dict(failures), wrong=dict(wrong),
        caller_p50_ms=latency.p50_ms, caller_p99_ms=latency.p99_ms, not_sent=load.not_sent,
        unanswered=load.sent - len(load.outcomes),
    )  # fmt: skip
    for line in summary.lines():
        print(line, file=out, flush=True)
    return rows, summary


@dataclass
class OverheadPhase:
    name: str
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    compared: int = 0
    shadow_shed: int = 0


def run_shadow_overhead(
    url: str, candidate: str, rate: float, phase_s: float, repeats: int = 1,
    settle_s: float = 1.0, out: TextIO | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Callers' latency with no rollout against a shadow at fraction 1.0, alternated.

    One load runs throughout: off, then (shadow, off) `repeats` times, so drift of the host
    hits both sides alike. Each phase is judged on the calls scheduled inside it after
    `settle_s`, leaving out the switch itself (the candidate's load and warm-up); the ratio
    pools every shadow phase against every off phase.
    """
    out = out or sys.stdout
    version = CANDIDATES[candidate]
    admin = Admin(url)
    names = ["off 1"] + [f"{kind} {i + 1}" for i in range(repeats) for kind in ("shadow", "off")]
    names[2::2] = [f"off {i + 2}" for i in range(repeats)]
    bounds: list[tuple[str, float, float]] = []
    windows: dict[str, dict[str, Any]] = {}
    seconds = len(names) * (phase_s + settle_s) + 60
    with OpenLoopLoad(url, rate, max_seconds=seconds) as load:
        for name in names:
            if name.startswith("shadow"):
                # An interval longer than the phase: the status read at its end then covers
                # the whole phase (each interval starts fresh windows).
                admin.start(
                    "--version", version, "--strategy", "shadow", "--shadow-fraction", "1",
                    "--step-interval", f"{10 * phase_s + 60}s", "--min-requests", "10",
                )  # fmt: skip
            begin = time.monotonic() + settle_s
            time.sleep(settle_s + phase_s)
            bounds.append((name, begin, time.monotonic()))
            if name.startswith("shadow"):
                windows[name] = admin.status().get("windows", {}).get(version, {})
                admin.rollback()
    admin.close()

    def pooled(kind: str) -> Result:
        chosen = [b for b in bounds if b[0].startswith(kind)]
        calls = [o for _, b, e in chosen for o in load.outcomes if b <= o.scheduled < e]
        return _latency(calls, sum(e - b for _, b, e in chosen), f"{kind} (pooled)")

    phases: list[OverheadPhase] = []
    for name, begin, end in bounds:
        result = _latency([o for o in load.outcomes if begin <= o.scheduled < end], end - begin)
        window = windows.get(name, {})
        phases.append(OverheadPhase(
            name, result.requests, result.errors, result.throughput_rps, result.p50_ms,
            result.p99_ms, int(window.get("compared", 0)), int(window.get("shadow_shed", 0)),
        ))  # fmt: skip
    base, shadow = pooled("off"), pooled("shadow")
    ratio = {
        "p50": shadow.p50_ms / base.p50_ms,
        "p99": shadow.p99_ms / base.p99_ms,
        "throughput": shadow.throughput_rps / base.throughput_rps,
    }
    lines = [
        f"shadow overhead: {rate:g} req/s offered, candidate {candidate} v{version}, "
        f"{phase_s:g} s per phase",
        f"{'phase':<16} {'answered':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'compared':>8} {'shed':>5}",
    ]
    for p in [*phases, *(OverheadPhase(r.model, r.requests, r.errors, r.throughput_rps,
                                       r.p50_ms, r.p99_ms) for r in (base, shadow))]:  # fmt: skip
        lines.append(
            f"{p.name:<16} {p.requests:>8} {p.errors:>6} {p.throughput_rps:>7.1f} "
            f"{p.p50_ms:>7.2f} {p.p99_ms:>7.2f} {p.compared:>8} {p.shadow_shed:>5}"
        )
    lines.append(
        f"shadow / off (pooled): p50 x{ratio['p50']:.2f}, "
        f"p99 x{ratio['p99']:.2f}, req/s x{ratio['throughput']:.2f}"
    )
    print("\n".join(lines), file=out, flush=True)
    return {
        "phases": [asdict(p) for p in phases],
        "off": asdict(base),
        "shadow": asdict(shadow),
        "ratio": ratio,
    }


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="good")
    parser.add_argument("--rate", type=float, default=100.0, help="offered req/s (default 100)")
    parser.add_argument(
        "--duration-per-step", type=float, default=5.0, metavar="S",
        help="canary step interval; with --shadow-overhead, seconds per phase (default 5)",
    )  # fmt: skip
    parser.add_argument("--steps", default="5,25,50,100", help="canary percents")
    parser.add_argument("--min-requests", type=int, default=50, help="per window, per version")
    parser.add_argument(
        "--max-seconds", type=float, default=None,
        help="give up waiting for a decision (default: 3 x steps x step + 20)",
    )  # fmt: skip
    parser.add_argument("--poll", type=float, default=0.5, help="status poll, seconds")
    parser.add_argument(
        "--max-p99-ms", type=float, default=30.0,
        help="the compute p99 gate (default 30: the slow candidate's +50 ms breaks it)",
    )  # fmt: skip
    parser.add_argument("--shadow-overhead", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=1, help="--shadow-overhead: (shadow, off) pairs after off"
    )
    parser.add_argument("--json", default=None, help="write the timeline / figures as JSON")
    args = parser.parse_args(argv)
    steps = len(args.steps.split(","))
    max_seconds = args.max_seconds or 3 * steps * args.duration_per_step + 20
    # The client shares the host with the server: other work on it shows in every figure.
    print(f"host: {os.cpu_count()} cores, load average {_load()} before", flush=True)
    root = Path(tempfile.mkdtemp(prefix="convoy-rollout-"))
    server = start_convoy(write_repository(root / "repo"))
    try:
        if args.shadow_overhead:
            report: dict[str, Any] = run_shadow_overhead(
                server.url, args.candidate, args.rate, args.duration_per_step, args.repeats
            )
            ok = True
        else:
            rows, summary = run_timeline(
                server.url, args.candidate, args.rate, args.duration_per_step, args.steps,
                args.min_requests, max_seconds, args.poll, args.max_p99_ms,
            )  # fmt: skip
            report = {"timeline": [asdict(r) for r in rows], "summary": asdict(summary)}
            ok = summary.phase in TERMINAL
    finally:
        code = server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"server stopped (exit {code}); load average {_load()} after", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
