"""Locust load test for any KServe v2 gRPC server (Convoy, Triton, ...).

    locust -f loadtests/locustfile.py --host 127.0.0.1:8001 --models tiny:3,image_classifier:1
    locust -f loadtests/locustfile.py --host 127.0.0.1:8001 --headless -u 32 -r 8 -t 60s \\
        --models tiny --batch 1 --csv results/tiny

Each simulated user sends ModelInfer calls back to back, choosing a model by
weight. Inputs are random data shaped from the model's metadata (variable dims
become 8), built once per model and reused, so the client costs little. Every
call is reported to Locust's statistics with its response time and size;
failures carry the gRPC status. --token adds `authorization: Bearer`.
"""

from __future__ import annotations

import random
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task

from loadtests.bench import build_request

grpc_gevent.init_gevent()  # grpc's blocking calls must yield to Locust's greenlets

_PAYLOADS: dict[tuple[str, str, int], bytes] = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--models",
        default="tiny",
        help="models to call with weights: name[:weight],... (default: tiny)",
    )
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--token", default="", help="bearer token for --auth-tokens servers")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per call")


def _parse_models(spec: str) -> tuple[list[str], list[float]]:
    names, weights = [], []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        names.append(name)
        weights.append(float(weight or 1))
    return names, weights


def _target(host: str) -> str:
    for prefix in ("grpc://", "http://", "https://"):
        host = host.removeprefix(prefix)
    return host.rstrip("/")


class KServeUser(User):
    """One client connection sending inference requests back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.target = _target(self.host or "127.0.0.1:8001")
        self.models, self.weights = _parse_models(options.models)
        self.batch = options.batch
        self.timeout = options.request_timeout
        self.metadata = (("authorization", f"Bearer {options.token}"),) if options.token else ()
        self.channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", 1 << 30),
                ("grpc.max_send_message_length", 1 << 30),
            ],
        )
        self.call = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )
        for model in self.models:
            key = (self.target, model, self.batch)
            if key not in _PAYLOADS:
                _PAYLOADS[key] = build_request(self.target, model, self.batch)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def infer(self) -> None:
        model = random.choices(self.models, self.weights)[0]
        payload = _PAYLOADS[(self.target, model, self.batch)]
        start = time.perf_counter()
        length = 0
        error: Exception | None = None
        try:
            response = self.call(payload, timeout=self.timeout, metadata=self.metadata)
            length = len(response)
        except grpc.RpcError as exc:
            error = RuntimeError(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"ModelInfer {model}",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=error,
            context={"model": model, "batch": self.batch},
        )
