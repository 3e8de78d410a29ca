"""convoy cost's arithmetic and its two sources (a server's exposition text, a fake
Prometheus HTTP API)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from convoy.cli import main
from convoy.cost.report import Reading, cost_rows, parse_prices
from convoy.cost.sources import from_prometheus, parse_exposition

EXPOSITION = """\
# TYPE convoy_model_busy_seconds counter
convoy_model_busy_seconds_total{device="cpu",model="a",version="1"} 30.0
convoy_model_busy_seconds_total{device="cuda:0",model="a",version="1"} 360.0
convoy_model_busy_seconds_total{device="cpu",model="b",version="2"} 10.0
# TYPE convoy_request_success counter
convoy_request_success_total{model="a",version="1"} 3000.0
convoy_request_success_total{model="b",version="2"} 1000.0
# TYPE convoy_model_memory_bytes gauge
convoy_model_memory_bytes{device="cpu",model="a",version="1"} 1048576.0
"""


def test_prices_parse_and_refuse_with_the_part_named() -> None:
    assert parse_prices("cpu=0.1") == {"cpu": 0.1, "gpu": 2.5}
    assert parse_prices("gpu=1, cpu=0") == {"cpu": 0.0, "gpu": 1.0}
    for bad, named in (("tpu=3", "tpu=3"), ("cpu=x", "'x'"), ("cpu=-1", "zero or more")):
        with pytest.raises(ValueError, match=named):
            parse_prices(bad)


def test_cost_per_1000_share_and_memory_from_the_exposition() -> None:
    rows = {r.model: r for r in cost_rows(parse_exposition(EXPOSITION), parse_prices("cpu=0.36"))}
    a, b = rows["a"], rows["b"]
    assert (a.inferences, b.inferences) == (3000, 1000)
    assert a.busy_s == {"cpu": 30.0, "cuda:0": 360.0}
    assert a.share == {"cpu": 0.75, "gpu": 1.0}
    assert b.share == {"cpu": 0.25}
    # a: 30 s at 0.36/h + 360 s (0.1 h) at 2.50/h = 0.003 + 0.25
    assert a.cost == pytest.approx(0.253)
    assert a.cost_per_1000 == pytest.approx(0.253 / 3)
    assert b.cost_per_1000 == pytest.approx(0.001)
    assert a.memory_bytes == {"cpu": 1048576.0}
    assert cost_rows([Reading("idle", "1")], parse_prices(""))[0].cost_per_1000 is None


class FakePrometheus(BaseHTTPRequestHandler):
    queries: list[str] = []

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["query"][0]
        FakePrometheus.queries.append(query)
        if "busy" in query:
            result = [{"metric": {"model": "a", "version": "1", "device": "cpu"},
                       "value": [0, "72"]}]  # fmt: skip
        elif "success" in query:
            result = [{"metric": {"model": "a", "version": "1"}, "value": [0, "2000"]}]
        else:
            result = []
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def prometheus() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_prometheus_windows_use_increase(prometheus: str, capsys: pytest.CaptureFixture) -> None:
    FakePrometheus.queries = []
    readings = from_prometheus(prometheus, 3600)
    assert [(r.model, r.busy_s, r.inferences) for r in readings] == [("a", {"cpu": 72.0}, 2000)]
    wanted = "increase(convoy_model_busy_seconds_total[3600s])"
    assert any(wanted in q for q in FakePrometheus.queries)
    assert main(["cost", "--prometheus-url", prometheus, "--since", "1h", "--json",
                 "--price", "cpu=1"]) == 0  # fmt: skip
    body = json.loads(capsys.readouterr().out)
    assert "over the last 1h" in body["window"]
    assert body["models"][0]["cost_per_1000"] == pytest.approx(72 / 3600 / 2)


def test_bad_flags_and_an_unreachable_server_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["cost", "--price", "cpu=abc"]) == 2
    assert "--price" in capsys.readouterr().err
    assert main(["cost", "--since", "soon"]) == 2
    assert "--since" in capsys.readouterr().err
    assert main(["cost", "--server", "127.0.0.1:1", "--timeout", "2"]) == 2
    assert "cannot read 127.0.0.1:1" in capsys.readouterr().err
