"""What rollouts do with SLOs: the max_burn_rate gate judges the candidate's burn rate in
the step window; `convoy rollout start --prometheus-url` refuses while the budget is
spent (--ignore-budget overrides). Fake repository and clock; a fake Prometheus API."""

from __future__ import annotations

import io
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from convoy.api.admin import status_to_proto
from convoy.cli import build_parser
from convoy.errors import DeadlineExceeded, FailedPrecondition, InternalError, InvalidInput
from convoy.monitoring.budget import read_budgets
from convoy.monitoring.objectives import parse_objectives
from convoy.rollouts.analysis import Outcome, evaluate
from convoy.rollouts.cli import run_rollout_command, status_json
from convoy.rollouts.declared import parse_policy
from convoy.rollouts.spec import Gates, make_spec
from convoy.rollouts.window import VersionWindow
from tests.test_rollout_controller import feed, make, run

OBJECTIVES = parse_objectives(
    {"objectives": [
        {"name": "availability", "kind": "availability", "target": 99.0},
        {"name": "fast", "kind": "latency", "target": 95.0, "threshold_ms": 50},
    ]},
    "slo.yaml", "m",
)  # fmt: skip
GATED = make_spec(
    "canary", step_interval_s=30, gates=Gates(max_error_rate=None, min_requests=50,
                                              max_burn_rate=10.0),
)  # fmt: skip


def _window(errors: int, slow: int, ok: int) -> VersionWindow:
    window = VersionWindow(objectives=OBJECTIVES.objectives)
    for _ in range(errors):
        window.record(InternalError("x"), 1_000_000, 1_000_000)
    for _ in range(slow):
        window.record(None, 10_000_000, 60_000_000)  # 70 ms: over 50
    for _ in range(ok):
        window.record(None, 1_000_000, 1_000_000)
    window.record(InvalidInput("a client's mistake"), 0, 0)  # no SLO event
    return window


def test_window_burn_rate_is_the_worst_objective() -> None:
    stats = _window(errors=2, slow=30, ok=168).snapshot()
    # availability: 2/200 over 1% = 1x; latency: 30/198 over 5% = 3.03x
    assert stats.burn_slo == "fast"
    assert stats.burn_rate == pytest.approx((30 / 198) / 0.05)
    assert stats.burn_events == 198
    assert VersionWindow().snapshot().burn_rate is None  # no objectives: nothing judged


def test_the_gate_fails_over_its_burn_rate_and_passes_under_it() -> None:
    gates = Gates(max_error_rate=None, min_requests=100, max_burn_rate=10.0)
    healthy = _window(errors=0, slow=0, ok=200).snapshot()
    burning = _window(errors=30, slow=0, ok=170).snapshot()  # 15% over a 1% budget: 15x
    verdict = evaluate(gates, burning, healthy)
    assert verdict.outcome is Outcome.FAIL
    assert "burn rate 15.0x of SLO 'availability' over 200 events" in verdict.reason
    assert "> max_burn_rate 10" in verdict.reason
    mild = _window(errors=5, slow=0, ok=195).snapshot()  # 2.5x
    assert evaluate(gates, mild, healthy).outcome is Outcome.PASS
    # Stable burning as fast in the same window: the host's trouble, not the candidate's.
    assert evaluate(gates, burning, burning).outcome is Outcome.PASS
    few = _window(errors=30, slow=0, ok=0).snapshot()  # under min_requests: not yet
    assert evaluate(gates, few, healthy).outcome is Outcome.INCONCLUSIVE


def test_a_canary_rolls_back_on_its_burn_rate() -> None:
    controller, repo, _ = make()
    controller.objectives = {"m": OBJECTIVES}
    run(controller.start("m", "2", GATED))

    def candidate_times_out(version: str, i: int) -> tuple[Any, float, float]:
        if version == "2" and i % 4 == 0:
            return DeadlineExceeded("timed out in the queue"), 0.0, 0.0
        return None, 1.0, 1.0

    feed(controller, 2000, candidate_times_out)
    run(controller.tick())
    status = controller.status("m")[0]
    assert status.phase == "rolled_back"
    assert "max_burn_rate 10" in status.reason and "SLO 'availability'" in status.reason
    assert repo.pinned["m"] == "1"
    # What `convoy rollout status --json` shows of it, through the admin API's message.
    shown = status_json(status_to_proto(status))["windows"]
    assert shown["2"]["burn_slo"] == "availability" and shown["2"]["burn_rate"] > 10
    assert shown["1"]["burn_rate"] == 0.0


def test_a_healthy_canary_under_the_gate_steps_on() -> None:
    controller, _, clock = make()
    controller.objectives = {"m": OBJECTIVES}
    run(controller.start("m", "2", GATED))
    feed(controller, 3000)
    clock.now += 31
    run(controller.tick())
    status = controller.status("m")[0]
    assert (status.phase, status.step) == ("progressing", 2)
    assert "burn rate 0.0x of SLO" in status.analysis


def test_window_latency_is_the_whole_server_side_time() -> None:
    """Queue + compute, as the server's SLO's arrival to answer: a request that waited
    45 ms and computed 10 is over a 50 ms threshold, though neither part is."""
    window = VersionWindow(objectives=OBJECTIVES.objectives)
    window.record(None, 45_000_000, 10_000_000)
    window.record(None, 20_000_000, 20_000_000)
    stats = window.snapshot()
    assert (stats.burn_slo, stats.burn_events) == ("fast", 2)
    assert stats.burn_rate == pytest.approx(0.5 / 0.05)


def test_the_gate_needs_declared_objectives() -> None:
    controller, _, _ = make()
    with pytest.raises(FailedPrecondition, match="model 'm' declares no SLO"):
        run(controller.start("m", "2", GATED))


def test_the_gate_needs_an_objective_the_server_counts() -> None:
    controller, _, _ = make()
    quality = parse_objectives(
        {"objectives": [{"name": "drift_free", "kind": "quality", "target": 95.0}]},
        "slo.yaml", "m",
    )  # fmt: skip
    controller.objectives = {"m": quality}
    with pytest.raises(FailedPrecondition, match="only quality objectives"):
        run(controller.start("m", "2", GATED))
    assert controller.status("m") == []  # refused: no rollout started


def test_the_gate_in_rollout_json_and_its_validation() -> None:
    spec = parse_policy({"strategy": "canary", "max_burn_rate": 14.4}, "rollout.json")
    assert spec.gates.max_burn_rate == 14.4
    with pytest.raises(InvalidInput, match="max_burn_rate"):
        make_spec("canary", gates=Gates(max_burn_rate=-1.0))


# -- convoy rollout start --prometheus-url ----------------------------------------------


class _Prometheus(BaseHTTPRequestHandler):
    result: list[dict[str, Any]] = []
    queries: list[str] = []

    def do_GET(self) -> None:
        type(self).queries.append(self.path)
        data = {"resultType": "vector", "result": type(self).result}
        body = json.dumps({"status": "success", "data": data})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[tuple[str, type[_Prometheus]]]:
    handler = type("Handler", (_Prometheus,), {"result": [], "queries": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


def _budget(slo: str, left: float) -> dict[str, Any]:
    return {"metric": {"__name__": "convoy_slo:error_budget_remaining:ratio", "model": "m",
                       "slo": slo, "window": "28d"}, "value": [0, str(left)]}  # fmt: skip


def _start(url: str, *extra: str) -> tuple[int, str, list[str]]:
    argv = ["rollout", "start", "m", "--version", "2", "--strategy", "canary",
            "--prometheus-url", url, "--server", "127.0.0.1:1", *extra]  # fmt: skip
    args = build_parser().parse_args(argv)
    err = io.StringIO()
    started: list[str] = []

    def no_server(_: Any) -> Any:  # reached only when the budget lets the start through
        started.append("start")
        raise RuntimeError("no server in this test")

    try:
        code = run_rollout_command(args, io.StringIO(), err, channel_factory=no_server)
    except RuntimeError:
        code = -1
    return code, err.getvalue(), started


def test_start_is_refused_while_the_budget_is_spent(
    prometheus: tuple[str, type[_Prometheus]],
) -> None:
    url, handler = prometheus
    handler.result = [_budget("availability", -0.25), _budget("fast", 0.6)]
    code, err, started = _start(url)
    assert (code, started) == (1, [])
    assert "refused: model 'm' has spent its error budget" in err
    assert "SLO 'availability': -25% of its 28d budget left" in err
    assert "--ignore-budget" in err
    assert "model%3D%22m%22" in handler.queries[0]
    code, err, started = _start(url, "--ignore-budget")
    assert started == ["start"] and "--ignore-budget: starting although" in err


def test_start_goes_on_with_budget_left_or_none_recorded(
    prometheus: tuple[str, type[_Prometheus]],
) -> None:
    url, handler = prometheus
    handler.result = [_budget("availability", 0.4), _budget("fast", float("nan"))]
    assert _start(url)[2] == ["start"]
    handler.result = []
    _, err, started = _start(url)
    assert started == ["start"] and "records no error budget for model 'm'" in err


def test_an_unreachable_prometheus_refuses_unless_ignored() -> None:
    code, err, started = _start("http://127.0.0.1:9")
    assert (code, started) == (2, []) and "cannot query Prometheus at http://127.0.0.1:9" in err
    assert _start("http://127.0.0.1:9", "--ignore-budget")[2] == ["start"]


def test_the_gate_survives_a_restart_and_judges_again(tmp_path: Any) -> None:
    from convoy.rollouts.store import RolloutStore

    store = RolloutStore(tmp_path)
    controller, repo, _ = make(store=store)
    controller.objectives = {"m": OBJECTIVES}
    run(controller.start("m", "2", GATED))
    again, _, _ = make(repo, RolloutStore(tmp_path))
    again.objectives = {"m": OBJECTIVES}
    run(again.restore())
    (status,) = again.status("m")
    assert status.phase == "progressing"
    feed(again, 2000, lambda v, i: (InternalError("x") if v == "2" else None, 1.0, 1.0))
    run(again.tick())
    assert again.status("m")[0].phase == "rolled_back"
    assert "max_burn_rate 10" in again.status("m")[0].reason


def test_the_budget_query_escapes_the_model_name(
    prometheus: tuple[str, type[_Prometheus]],
) -> None:
    url, handler = prometheus
    assert read_budgets(url, 'we"ird\\name') == []
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.queries[-1]).query)["query"]
    assert query == ['convoy_slo:error_budget_remaining:ratio{model="we\\"ird\\\\name"}']
