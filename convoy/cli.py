"""Command line: argument parsing -> ServerConfig -> run. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import __version__
from .arguments import number
from .batch.cli import add_batch_parser, run_batch
from .batching.budget import parse_share
from .cache import CacheConfigError, parse_cache_config
from .capture.cli import add_dataset_parser, run_dataset_command
from .capture.replay_cli import add_replay_parser, run_replay
from .config import (
    DEFAULT_BACKGROUND_COMPUTE_SHARE,
    DEFAULT_BACKGROUND_LOOP_SHARE,
    MODEL_CONTROL_MODES,
    CaptureConfig,
    ModelControl,
    ServerConfig,
    ServingLimits,
    TracingConfig,
)
from .cost.cli import add_cost_parser, run_cost
from .features.cli import add_skew_parser, run_skew
from .inference.tracing import parse_endpoint, parse_sample_rate
from .monitoring.cli import add_monitor_parser, run_monitor
from .monitoring.slo_cli import add_slo_parser, run_slo
from .optimize.cli import add_optimize_parser, run_optimize
from .progress import progress_bar
from .rollouts.cli import add_rollout_parser, run_rollout_command

_positive_float = number(float, 0, strict=True)
_positive_int = number(int, 0, strict=True)
_non_negative_int = number(int, 0, strict=False)
T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with its reason."""

    def typed(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return typed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convoy",
        description="Convoy: an inference server speaking Triton's KServe v2 gRPC protocol.",
    )
    parser.add_argument("--version", action="version", version=f"convoy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve the models of a Triton-style repository over gRPC, with "
        "Prometheus metrics on a separate HTTP port. SIGTERM drains: new requests are "
        "refused, those in flight finish within --grace-period.",
    )
    serve.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory of <model>/config.pbtxt and <model>/<version>/ folders; "
        "omitted: build (once, cached) and serve the built-in example models",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument(
        "--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one)"
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="KServe v2 HTTP/REST port (default 8000; 0 picks a free one; -1 disables)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Prometheus /metrics HTTP port (default 8002; 0 picks a free one; -1 disables)",
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may take to finish (default 30)",
    )
    serve.add_argument(
        "--max-message-mb",
        type=int,
        default=256,
        help="largest gRPC message accepted or sent, in MiB (default 256)",
    )
    serve.add_argument(
        "--no-reflection", action="store_true", help="turn gRPC server reflection off"
    )
    serve.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the loaded models' objects to the garbage collector's full "
        "collections (pauses of ~100 ms under load); by default they are frozen",
    )
    serve.add_argument(
        "--max-queue-size",
        type=int,
        default=1024,
        help="requests queued per model and priority level where config.pbtxt sets no "
        "max_queue_size (default 1024; 0: unbounded, as in Triton); beyond it, "
        "RESOURCE_EXHAUSTED at once",
    )
    serve.add_argument(
        "--max-elements",
        type=int,
        default=1 << 28,
        help="largest element count of one request input (default 2^28)",
    )
    serve.add_argument(
        "--repository-poll-secs",
        type=float,
        default=None,
        metavar="SECONDS",
        help="scan the repository this often and load models whose versions or config "
        "changed (Triton's poll mode); a model with a rollout.json gets its declared rollout; "
        "a failed load is tried again, at once when its files change, else with a back-off "
        "(default: off)",
    )
    serve.add_argument(
        "--model-control-mode",
        choices=MODEL_CONTROL_MODES,
        default="none",
        help="none: load every model at start-up; poll: also reload changed ones "
        "(--repository-poll-secs, default 15); explicit: load only --load-model; "
        "on-demand: list every model, load each on its first request, evict by measured "
        "memory (docs/models.md). Default none",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="explicit and on-demand modes: load this model at start-up (repeatable); "
        "on-demand keeps it loaded (never evicted)",
    )
    serve.add_argument(
        "--load-wait-secs",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="on-demand: how long a request without a deadline waits for its model to "
        "load (default 30); a request's own deadline bounds it otherwise",
    )
    serve.add_argument(
        "--memory-budget-mib",
        type=_positive_int,
        default=None,
        metavar="N",
        help="on-demand: host memory the loaded models may take, as measured at each "
        "load; a load past it evicts the least recently used idle models first, and "
        "fails RESOURCE_EXHAUSTED if they cannot make room (default: no budget)",
    )
    serve.add_argument(
        "--gpu-memory-budget-mib",
        type=_positive_int,
        default=None,
        metavar="N",
        help="on-demand: the same, per GPU, measured as each GPU's used memory "
        "(default: no budget)",
    )
    serve.add_argument(
        "--evict-idle-secs",
        type=_positive_float,
        default=None,
        metavar="S",
        help="on-demand: unload a model no request has used for this long (default: never)",
    )
    serve.add_argument(
        "--rollout-state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where rollout state is kept across restarts (default: <repository>/.convoy/rollouts)",
    )
    serve.add_argument(
        "--frontends",
        type=int,
        default=0,
        metavar="N",
        help="gRPC front-end processes on the port (SO_REUSEPORT) feeding this engine; "
        "default 0: one per 4 cores, at least 1 and at most 8 (so 1, no IPC hop, on a "
        "2-core machine)",
    )
    serve.add_argument(
        "--frontend-shm-mib",
        type=int,
        default=16,
        metavar="MIB",
        help="shared memory per front end for tensors of 64 KiB or more, half each way "
        "(default 16; larger tensors and a full ring travel inline; 0: all inline). "
        "N front ends need N times this in /dev/shm",
    )
    serve.add_argument(
        "--cache-config",
        action="append",
        metavar="local,size=BYTES",
        help="a response cache of this many bytes (Triton's flag; KiB/MiB/GiB suffixes), "
        "for models with response_cache { enable: true } (docs/cache.md)",
    )
    serve.add_argument(
        "--capture-dir",
        metavar="URI",
        help="capture answered requests to Parquet here (a directory or a filesystem URI "
        "such as s3://bucket/prefix: pyarrow's, else fsspec's), for the models whose config sets "
        "capture_sample_rate (docs/capture.md); off when not given",
    )
    serve.add_argument(
        "--capture-flush-secs",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="write buffered capture rows at least this often (default 10)",
    )
    serve.add_argument(
        "--capture-max-mib",
        type=_positive_int,
        default=64,
        metavar="MIB",
        help="memory for captured rows not yet written; past it rows are dropped and "
        "counted, never waited for (default 64)",
    )
    serve.add_argument(
        "--capture-retention-days",
        type=_non_negative_int,
        default=0,
        metavar="DAYS",
        help="delete capture partitions older than this many days (default 0: keep all)",
    )
    serve.add_argument(
        "--trace-endpoint",
        type=_argument(parse_endpoint),
        metavar="HOST:PORT",
        help="send OpenTelemetry traces to this OTLP/gRPC collector (e.g. localhost:4317; "
        "needs the otel extra); a caller's sampled W3C traceparent is continued "
        "(docs/tracing.md); off when not given",
    )
    serve.add_argument(
        "--trace-sample-rate",
        type=_argument(parse_sample_rate),
        default=None,
        metavar="R",
        help="trace this fraction (0 to 1) of the requests that come without a "
        "traceparent (default 0: only those a caller sampled); needs --trace-endpoint",
    )
    serve.add_argument(
        "--max-connection-age-ms",
        type=int,
        default=30_000,
        metavar="MS",
        help="close each client connection gracefully after this long (gRPC's "
        "grpc.max_connection_age_ms), so long-lived channels rebalance across replicas "
        "(default 30000; 0: never)",
    )
    serve.add_argument(
        "--slo-config",
        type=Path,
        metavar="FILE",
        help="service-level objectives of many models ('models: {MODEL: {objectives: "
        "[...]}}'), besides each <model>/slo.yaml; the server exports their burn rates and "
        "sheds background work while one burns fast (docs/slo.md)",
    )
    serve.add_argument(
        "--background-loop-share",
        type=_argument(parse_share),
        default=DEFAULT_BACKGROUND_LOOP_SHARE,
        metavar="S",
        help="while callers are about (one in the last second), background requests "
        "(`convoy batch --server`, replays: the request parameter background) may take "
        f"at most this share of the server's event loop, above 0 and at most 1 (default "
        f"{DEFAULT_BACKGROUND_LOOP_SHARE:g}); with no caller about, no limit (docs/batch.md)",
    )
    serve.add_argument(
        "--background-compute-share",
        type=_argument(parse_share),
        default=DEFAULT_BACKGROUND_COMPUTE_SHARE,
        metavar="S",
        help="while callers are about, background batches may take at most this share of "
        f"a model's instance time, above 0 and at most 1 (default "
        f"{DEFAULT_BACKGROUND_COMPUTE_SHARE:g}); with no caller about, no limit "
        "(docs/batch.md)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    security = serve.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="PEM server certificate: serve TLS")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-ca", type=Path, help="PEM CA: require client certificates it signed (mutual TLS)"
    )
    security.add_argument(
        "--auth-tokens",
        type=Path,
        metavar="FILE",
        help="require 'authorization: Bearer TOKEN'; FILE has 'TOKEN ROLE' lines, ROLE "
        "infer or admin (admin may also load/unload). Health and liveness stay open",
    )
    security.add_argument(
        "--rate-limit",
        type=_positive_float,
        metavar="RPS",
        help="requests per second allowed per client (per token with --auth-tokens)",
    )
    security.add_argument(
        "--rate-burst",
        type=_positive_float,
        metavar="N",
        help="burst size for --rate-limit (default RPS, at least 1)",
    )

    examples = commands.add_parser(
        "build-examples",
        help="write the built-in example repository to a directory",
        description="Build the example models (MiniLM embedding, CNN classifier, tiny model) "
        "into DIR, so they can be served with --model-repository DIR.",
    )
    examples.add_argument("directory", type=Path)

    engine = commands.add_parser(
        "build-engine",
        help="build (or find cached) the TensorRT engine of a model",
        description="Build the TensorRT engine for MODEL_DIR's latest version model.onnx, "
        "with the precision and profiles its config.pbtxt implies, into the engine cache "
        "that `convoy serve` reads. Shows progress; takes minutes. Needs a GPU and the "
        "gpu extra.",
    )
    engine.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    engine.add_argument("--gpu", type=int, default=0, help="GPU index (default 0)")
    add_rollout_parser(commands)
    add_monitor_parser(commands)
    add_optimize_parser(commands)
    add_dataset_parser(commands)
    add_replay_parser(commands)
    add_slo_parser(commands)
    add_cost_parser(commands)
    add_skew_parser(commands)
    add_batch_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build-engine":
        return build_engine_command(args.model_dir, args.gpu)
    if args.command == "rollout":
        return run_rollout_command(args)
    if args.command == "monitor":
        return run_monitor(args)
    if args.command == "optimize":
        return run_optimize(args)
    if args.command == "dataset":
        return run_dataset_command(args)
    if args.command == "replay":
        return run_replay(args)
    if args.command == "slo":
        return run_slo(args)
    if args.command == "cost":
        return run_cost(args)
    if args.command == "skew":
        return run_skew(args)
    if args.command == "batch":
        return run_batch(args, lower_priority=True)
    if args.command == "build-examples":
        from .repository.examples import build_examples

        build_examples(args.directory)
        print(args.directory)
        return 0

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cache = parse_cache_config(args.cache_config) if args.cache_config else None
    except CacheConfigError as exc:
        print(f"convoy serve: --cache-config: {exc}", file=sys.stderr)
        return 2
    capture = capture_config(args)
    if args.trace_sample_rate is not None and args.trace_endpoint is None:
        print("convoy serve: --trace-sample-rate needs --trace-endpoint", file=sys.stderr)
        return 2
    tracing = None
    if args.trace_endpoint is not None:
        tracing = TracingConfig(args.trace_endpoint, args.trace_sample_rate or 0.0)
    config = ServerConfig(
        model_repository=args.model_repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        grace_period_s=args.grace_period,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        reflection=not args.no_reflection,
        freeze_heap=not args.no_gc_freeze,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        auth_tokens=args.auth_tokens,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        limits=ServingLimits(
            max_queue_size=args.max_queue_size,
            max_elements=args.max_elements,
            background_compute_share=args.background_compute_share,
        ),
        repository_poll_s=args.repository_poll_secs,
        rollout_state_dir=args.rollout_state_dir,
        max_connection_age_ms=args.max_connection_age_ms,
        cache=cache,
        frontends=args.frontends,
        frontend_shm_bytes=args.frontend_shm_mib << 20,
        capture=capture,
        slo_config=args.slo_config,
        model_control=ModelControl(
            mode=args.model_control_mode,
            load_models=tuple(args.load_model),
            load_wait_s=args.load_wait_secs,
            memory_budget_bytes=_mib(args.memory_budget_mib),
            gpu_memory_budget_bytes=_mib(args.gpu_memory_budget_mib),
            evict_idle_s=args.evict_idle_secs,
        ),
        tracing=tracing,
        background_loop_share=args.background_loop_share,
    )
    from .app import run
    from .errors import ConfigError

    try:
        run(config)
    except ConfigError as exc:  # found at start-up, before serving: the message says it all
        print(f"convoy serve: {exc.message}", file=sys.stderr)
        return 2
    return 0


def capture_config(args: argparse.Namespace) -> CaptureConfig | None:
    """`convoy serve`'s --capture-* flags; None: capture off (no --capture-dir)."""
    if not args.capture_dir:
        return None
    return CaptureConfig(
        uri=args.capture_dir,
        flush_s=args.capture_flush_secs,
        max_bytes=args.capture_max_mib << 20,
        retention_days=args.capture_retention_days,
    )


def _mib(value: int | None) -> int | None:
    return None if value is None else value << 20


def build_engine_command(model_dir: Path, gpu: int) -> int:
    from .config import CONFIG_FILENAME, read_model_config, validate_model_config
    from .errors import ConvoyError

    try:
        config = read_model_config(model_dir)
        if not config.backend and not config.platform:
            config.backend = "tensorrt"
        spec = validate_model_config(config, str(model_dir / CONFIG_FILENAME), model_dir.name)
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        if not versions:
            print(f"{model_dir}: no version directory", file=sys.stderr)
            return 2
        try:
            from .backends.tensorrt import build_engine
        except ImportError as exc:
            print(f"TensorRT is not available here ({exc}); install the gpu extra", file=sys.stderr)
            return 2
        plan = build_engine(model_dir / str(versions[-1]) / "model.onnx", spec, gpu, progress_bar)
    except ConvoyError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
