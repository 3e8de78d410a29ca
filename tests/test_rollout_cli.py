"""`convoy rollout` parsing, and the CLI against the real admin service on grpc.aio."""

from __future__ import annotations

import argparse
import asyncio
import io
import json

import grpc
import pytest

from convoy.api.admin import ADMIN_METHODS, add_rollout_service
from convoy.rollouts.cli import add_rollout_parser, run_rollout_command, start_request
from tests.test_rollout_controller import make


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="convoy")
    add_rollout_parser(top.add_subparsers(dest="command", required=True))
    return top


def test_start_flags_become_the_request() -> None:
    args = parser().parse_args(
        "rollout start m --version 2 --strategy canary --steps 5,50,100 --step-interval 1m "
        "--max-p99-ms 40 --max-divergence 0.01 --min-requests 20 --server h:1".split()
    )
    request = start_request(args)
    assert (request.model, request.version, request.spec.strategy) == ("m", "2", "canary")
    assert list(request.spec.steps) == [5.0, 50.0, 100.0]
    assert request.spec.step_interval_s == 60.0
    assert request.spec.gates.max_p99_ms == 40.0
    assert request.spec.gates.min_requests == 20
    assert not request.spec.gates.HasField("max_error_rate")  # the server's default applies
    assert not request.spec.HasField("shadow_fraction")
    assert args.server == "h:1"


@pytest.mark.parametrize(
    "argv",
    [
        "rollout start m --strategy canary",  # no --version
        "rollout start m --version 2 --strategy linear",
        "rollout start m --version 2 --strategy canary --steps 5,x",
        "rollout start m --version 2 --strategy canary --step-interval soon",
        "rollout start m --version 2 --strategy canary --min-requests 0",
        "rollout promote",
        "rollout",
    ],
)
def test_bad_command_lines_are_refused(argv: str) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv.split())


def test_every_admin_rpc_needs_the_admin_role() -> None:
    assert "/convoy.admin.RolloutService/Start" in ADMIN_METHODS
    assert "/convoy.admin.RolloutService/Status" in ADMIN_METHODS
    assert len(ADMIN_METHODS) == 7


def test_cli_drives_a_real_admin_service() -> None:
    async def scenario() -> list[tuple[int, str, str]]:
        controller, _, _ = make()
        server = grpc.aio.server()
        add_rollout_service(server, controller)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        results = []
        try:
            for line in (
                "start m --version 2 --strategy canary --steps 10,100 --max-p99-ms 50",
                "start m --version 3 --strategy canary",
                "status --json",
                "pause m",
                "status m",
                "start nope --version 2 --strategy ab",
                "weight m 40",
                "rollback m",
                "status m --json",
            ):
                argv = ["rollout", *line.split(), "--server", f"127.0.0.1:{port}"]
                args = parser().parse_args(argv)
                out, err = io.StringIO(), io.StringIO()
                rc = await asyncio.to_thread(run_rollout_command, args, out, err)
                results.append((rc, out.getvalue(), err.getvalue()))
        finally:
            await server.stop(None)
        return results

    (
        started,
        second,
        status_json,
        paused,
        status_text,
        unknown,
        weight,
        rolled_back,
        final,
    ) = asyncio.run(scenario())
    assert started[0] == 0 and "canary v1 -> v2, progressing step 1/2; v1 90%, v2 10%" in started[1]
    assert second[0] == 1
    assert "INVALID_ARGUMENT" in second[2] and "already has a canary rollout" in second[2]
    record = json.loads(status_json[1])
    assert {k: record[k] for k in ("model", "strategy", "phase", "stable", "candidate")} == {
        "model": "m",
        "strategy": "canary",
        "phase": "progressing",
        "stable": "1",
        "candidate": "2",
    }
    assert record["weights"] == {"1": 90.0, "2": 10.0}
    assert record["reason"].startswith("started canary of version 2 over 1")
    assert record["windows"]["2"]["requests"] == 0
    assert paused[0] == 0 and "paused" in paused[1]
    assert "reason:   paused by the operator" in status_text[1]
    assert unknown[0] == 1 and "NOT_FOUND" in unknown[2]
    assert weight[0] == 1 and "only an ab rollout takes a weight" in weight[2]
    assert rolled_back[0] == 0
    final_record = json.loads(final[1])
    assert final_record["phase"] == "rolled_back"
    assert final_record["weights"] == {"1": 100.0, "2": 0.0}
    assert final_record["reason"] == "rolled back by the operator"
