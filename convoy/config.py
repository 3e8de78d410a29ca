"""Typed configuration: the server's own settings and each model's config.pbtxt.

config.pbtxt is parsed with protobuf's text format into the Triton schema
(protos/model_config.proto), then validated into frozen dataclasses that the
rest of the server reads. Every validation error names the file and field.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from convoy.kernels.image import IMAGENET_MEAN, IMAGENET_STD

from .errors import ConfigError
from .pb import model_config_pb2 as mc
from .tensors import CONFIG_TO_WIRE

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"
ENSEMBLE = "ensemble"  # Triton's platform name for a DAG of other models
SLO_PARAMETER = "latency_slo_p99_ms"
TIMEOUT_PARAMETER = "execution_timeout_ms"
SPILL_PARAMETER = "cpu_spill_after_ms"
SOFTMAX_PARAMETER = "classification_softmax"

# Triton's platform names and the backend each one means.
PLATFORM_TO_BACKEND = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
}
BACKEND_TO_PLATFORM = {backend: platform for platform, backend in PLATFORM_TO_BACKEND.items()}
DEFAULT_MODEL_FILENAME = {
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt",
    "tensorrt": "model.plan",
    "convoy_python": "model.py",
    "python": "model.py",  # Triton's python backend: class TritonPythonModel
}


@dataclass(frozen=True)
class CacheConfig:
    """The server-wide response cache (Triton's `--cache-config local,size=BYTES`;
    parsed by cache.parse_cache_config)."""

    size_bytes: int
    implementation: str = "local"


# Chosen from measurements: inference/background.py and batching/queue.py say which.
DEFAULT_BACKGROUND_LOOP_SHARE = 0.01
DEFAULT_BACKGROUND_COMPUTE_SHARE = 0.05


@dataclass(frozen=True)
class ServingLimits:
    """Server-wide bounds that keep memory flat under overload."""

    max_queue_size: int = 1024  # per model priority level, where config.pbtxt sets none
    max_elements: int = 1 << 28  # tensor elements per request input
    # While callers are about: the share of a model's instance time background batches
    # may take (--background-compute-share; batching/budget.py). None: no limit.
    background_compute_share: float | None = DEFAULT_BACKGROUND_COMPUTE_SHARE


DEFAULT_LIMITS = ServingLimits()


@dataclass(frozen=True)
class CaptureConfig:
    """Where and how served requests are written (`--capture-*`, docs/capture.md)."""

    uri: str  # a local directory or a pyarrow/fsspec filesystem URI (s3://bucket/prefix)
    flush_s: float = 10.0
    max_bytes: int = 64 << 20  # rows copied but not yet written; past it, rows are dropped
    retention_days: int = 0  # 0: keep every partition


MODEL_CONTROL_MODES = ("none", "poll", "explicit", "on-demand")
DEFAULT_POLL_S = 15.0  # Triton's --repository-poll-secs default


@dataclass(frozen=True)
class ModelControl:
    """Which models load when (`--model-control-mode`, docs/models.md): none loads every
    model at start-up, poll also reloads changed ones, explicit loads only `load_models`,
    on-demand lists every model and loads each on its first request, within budgets."""

    mode: str = "none"
    load_models: tuple[str, ...] = ()  # --load-model: loaded at start-up; pinned on-demand
    load_wait_s: float = 30.0  # how long a request without a deadline waits for a load
    memory_budget_bytes: int | None = None  # host memory for models (on-demand)
    gpu_memory_budget_bytes: int | None = None  # per GPU (on-demand)
    evict_idle_s: float | None = None  # unload a model idle this long (on-demand)

    def check(self, repository_poll_s: float | None = None) -> None:
        """ConfigError naming the flag that does not fit the mode."""
        if self.mode not in MODEL_CONTROL_MODES:
            raise ConfigError(
                "--model-control-mode", "mode", f"'{self.mode}' is not one of {MODEL_CONTROL_MODES}"
            )
        if self.load_models and self.mode not in ("explicit", "on-demand"):
            raise ConfigError(
                "--load-model", "mode", "needs --model-control-mode explicit or on-demand"
            )
        on_demand_only = {
            "--memory-budget-mib": self.memory_budget_bytes,
            "--gpu-memory-budget-mib": self.gpu_memory_budget_bytes,
            "--evict-idle-secs": self.evict_idle_s,
        }
        for flag, value in on_demand_only.items():
            if value is not None and self.mode != "on-demand":
                raise ConfigError(flag, "mode", "needs --model-control-mode on-demand")
        if repository_poll_s and self.mode == "on-demand":
            # The poller would reload evicted models and retry failed loads in a loop.
            raise ConfigError(
                "--repository-poll-secs",
                "mode",
                "needs --model-control-mode none, poll or explicit (on-demand loads each "
                "model on its first request)",
            )


@dataclass(frozen=True)
class TracingConfig:
    """`--trace-endpoint` and `--trace-sample-rate` (docs/tracing.md)."""

    endpoint: str  # HOST:PORT of an OTLP/gRPC collector (plaintext)
    sample_rate: float = 0.0  # of requests that arrive without a traceparent


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one `convoy serve` process."""

    model_repository: Path | None = None  # None: build and serve the built-in examples
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # 0: any free port (the log says which)
    http_port: int = 8000  # KServe v2 HTTP/REST; 0: any free port; -1: off
    metrics_port: int = 8002  # 0: any free port; -1: no metrics endpoint
    grace_period_s: float = 30.0
    max_message_bytes: int = 256 * 1024 * 1024
    reflection: bool = True
    gil_switch_interval_s: float = 0.0002
    freeze_heap: bool = True  # loaded models' objects out of full collections (heap.py)
    tls_cert: Path | None = None  # PEM; with tls_key, serve TLS
    tls_key: Path | None = None
    tls_ca: Path | None = None  # PEM; given, clients must present a certificate it signed
    auth_tokens: Path | None = None  # "TOKEN ROLE" lines; given, calls need a bearer token
    rate_limit: float | None = None  # requests/s per client (token), None: unlimited
    rate_burst: float | None = None
    limits: ServingLimits = ServingLimits()
    repository_poll_s: float | None = None  # None: load at start-up and on request only
    rollout_state_dir: Path | None = None  # None: <repository>/.convoy/rollouts
    # Connections are closed (gracefully) after this long, so long-lived client
    # channels reconnect and rebalance onto new replicas; 0: never.
    max_connection_age_ms: int = 30_000
    cache: CacheConfig | None = None  # --cache-config local,size=BYTES; None: no cache
    frontends: int = 1  # gRPC front-end processes; 0: one per 4 cores (1 on 2 cores)
    frontend_shm_bytes: int = 16 << 20  # each front end's tensor segment; 0: none
    capture: CaptureConfig | None = None  # --capture-dir and its settings; None: off
    # --slo-config: objectives of many models, besides each <model>/slo.yaml
    slo_config: Path | None = None
    model_control: ModelControl = ModelControl()  # --model-control-mode and its flags
    tracing: TracingConfig | None = None  # --trace-endpoint and its rate; None: off
    # --background-loop-share: background requests' share of the event loop while callers
    # are about (inference/background.py)
    background_loop_share: float = DEFAULT_BACKGROUND_LOOP_SHARE


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output, without the batch dimension."""

    name: str
    datatype: str  # wire datatype: FP32, BYTES, ...
    dims: tuple[int, ...]  # -1 marks a variable dimension
    optional: bool = False
    label_filename: str = ""  # outputs: labels for the classification extension

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete per-item shape fits these dims."""
        dims = self.dims
        if shape == dims:  # fixed dims, the common case: one comparison
            return True
        if len(shape) != len(dims):
            return False
        for d, s in zip(dims, shape, strict=True):
            if d != -1 and d != s:
                return False
        return True


@dataclass(frozen=True)
class QueuePolicy:
    timeout_action: str = "REJECT"  # or "DELAY"
    default_timeout_us: int = 0  # 0: no timeout
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0: unbounded


@dataclass(frozen=True)
class BatchingConfig:
    """config.pbtxt `dynamic_batching`."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policies: dict[int, QueuePolicy] = field(default_factory=dict)

    def policy_for(self, level: int) -> QueuePolicy:
        return self.priority_queue_policies.get(level, self.default_queue_policy)


@dataclass(frozen=True)
class InstanceGroupSpec:
    name: str
    kind: str  # KIND_CPU, KIND_GPU, KIND_AUTO
    count: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class CudaOptions:
    """config.pbtxt `optimization { cuda { ... } }`, as Triton spells it."""

    graphs: bool = False
    graph_batch_sizes: tuple[int, ...] = ()  # from graph_spec[].batch_size
    busy_wait_events: bool = False  # spin on completion: lower latency, a core kept busy


@dataclass(frozen=True)
class Accelerator:
    """One `optimization.execution_accelerators` entry, as Triton spells it."""

    name: str  # gpu: "tensorrt" | "cuda"; cpu: "openvino"
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Optimization:
    """config.pbtxt `optimization`, the parts Convoy's runtimes read."""

    cuda: CudaOptions = CudaOptions()
    gpu_accelerators: tuple[Accelerator, ...] = ()
    cpu_accelerators: tuple[Accelerator, ...] = ()
    graph_level: int = 0  # ONNX Runtime: 0 all, -1 basic, 1 extended, 2 none (Triton's)


@dataclass(frozen=True)
class WarmupInput:
    """One input of a `model_warmup` sample."""

    datatype: str  # wire datatype
    dims: tuple[int, ...]  # without the batch dimension
    source: str  # "zero" | "random" | "file"
    file: str = ""  # with source "file": a file in the model's warmup/ directory


@dataclass(frozen=True)
class WarmupSample:
    """config.pbtxt `model_warmup`: run at load, before the model is marked ready."""

    name: str
    batch_size: int
    inputs: dict[str, WarmupInput]
    count: int


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those present on disk, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :] if ordered else []


PYTORCH_PRECISIONS = ("fp32", "fp16", "bf16")
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")
PREPROCESSORS = ("image_hwc_uint8",)
POSTPROCESSORS = ("mean_pool_l2",)


@dataclass(frozen=True)
class ImageOptions:
    """parameters preprocess / preprocess_mean / preprocess_std (backends/preprocess.py)."""

    input: str  # the one UINT8 [H, W, 3] input
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class TextOptions:
    """parameters tokenizer / tokenizer_max_length / postprocess (backends/text.py)."""

    input: str  # the one BYTES [1] input
    tokenizer: str  # a file in the version directory
    max_length: int = 256
    postprocess: str | None = None  # "mean_pool_l2"


@dataclass(frozen=True)
class TensorRTOptions:
    """parameters trt_* (backends/tensorrt.py, tensorrt_plan.py)."""

    precision: str = "fp16"
    calibration_dir: str | None = None  # .npz batches in the version directory
    dynamic_min: int = 1  # range of every -1 dim past the batch in the profile
    dynamic_opt: int = 128
    dynamic_max: int = 512


@dataclass(frozen=True)
class BackendOptions:
    """The `parameters` that Convoy's runtimes read, typed and checked with the
    config, so a typo fails the load naming the key, before any engine build.
    Other keys are left alone: other features and Triton users put their own there."""

    precision: str = "fp32"  # PyTorch on a GPU: weights and floating inputs
    cuda_graph_batch_sizes: tuple[int, ...] = ()  # PyTorch: buckets to capture
    intra_op_thread_count: int | None = None  # ONNX Runtime; None: the server's share
    image: ImageOptions | None = None
    text: TextOptions | None = None
    tensorrt: TensorRTOptions = TensorRTOptions()
    softmax_outputs: frozenset[str] = frozenset()  # classification by probability


@dataclass(frozen=True)
class EnsembleStep:
    """One step of ensemble_scheduling: a model and how its tensors map to the
    ensemble's (model tensor name, ensemble tensor name), in the config's order."""

    model: str
    version: int  # -1: the version the model serves by default
    input_map: tuple[tuple[str, str], ...]
    output_map: tuple[tuple[str, str], ...]


CAPTURE_SAMPLE_RATE = "capture_sample_rate"
CAPTURE_BY = "capture_by"
CAPTURE_OUTPUTS = "capture_outputs"
CAPTURE_EXCLUDE = "capture_exclude"
CAPTURE_HASH = "capture_hash"
CAPTURE_KEYS = (CAPTURE_SAMPLE_RATE, CAPTURE_BY, CAPTURE_OUTPUTS, CAPTURE_EXCLUDE, CAPTURE_HASH)
CAPTURE_BY_VALUES = ("random", "request_id", "ab_key")


@dataclass(frozen=True)
class CaptureSpec:
    """Which of a model's requests the server's capture (`--capture-dir`) writes, and how
    (docs/capture.md). `by`: random, or by a hash of the request id or A/B key, so that
    one key is always in or always out."""

    sample_rate: float
    by: str = "random"
    outputs: bool = True
    exclude: frozenset[str] = frozenset()  # input names never written
    hashed: frozenset[str] = frozenset()  # input names written as salted SHA-256


@dataclass(frozen=True)
class ModelSpec:
    """A validated model configuration."""

    name: str
    backend: str  # onnxruntime | pytorch | tensorrt
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig | None
    instance_groups: tuple[InstanceGroupSpec, ...]
    version_policy: VersionPolicy
    default_model_filename: str
    parameters: dict[str, str] = field(default_factory=dict)
    optimization: Optimization = Optimization()
    warmup: tuple[WarmupSample, ...] = ()
    options: BackendOptions = BackendOptions()
    ensemble: tuple[EnsembleStep, ...] = ()  # platform "ensemble" only
    response_cache: bool = False  # Triton's response_cache { enable: true }
    capture: CaptureSpec | None = None  # parameters capture_*; None: never captured
    # parameters feast_*: `inputs` are then what callers send (entity keys), and the
    # runtime is built with features.model_inputs (convoy/features/).
    features: FeatureSpec | None = None

    @property
    def captured_inputs(self) -> tuple[TensorSpec, ...]:
        """What capture writes as `inputs`: the request's, plus each looked-up feature."""
        return self.inputs if self.features is None else self.inputs + self.features.captured

    @property
    def cuda(self) -> CudaOptions:
        return self.optimization.cuda

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def execution_timeout_s(self) -> float | None:
        """parameters { key: "execution_timeout_ms" }: validated at load time."""
        value = self.parameters.get(TIMEOUT_PARAMETER)
        return None if value is None else float(value) / 1000

    @property
    def cpu_spill_after_s(self) -> float | None:
        """parameters { key: "cpu_spill_after_ms" }: validated at load time."""
        value = self.parameters.get(SPILL_PARAMETER)
        return None if value is None else float(value) / 1000

    @property
    def latency_slo_ns(self) -> int | None:
        """parameters { key: "latency_slo_p99_ms" }: validated at load time."""
        value = self.parameters.get(SLO_PARAMETER)
        return None if value is None else int(float(value) * 1e6)

    @property
    def softmax_outputs(self) -> frozenset[str]:
        """parameters { key: "classification_softmax" value { string_value: "LOGITS" } }:
        outputs whose classification values are softmax probabilities, not raw scores."""
        return self.options.softmax_outputs

    @functools.cached_property
    def _inputs_by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.inputs}

    @functools.cached_property
    def _outputs_by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.outputs}

    @functools.cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs_by_name.get(name)

    def shape_key(
        self, item_shapes: dict[str, tuple[int, ...]]
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Names and per-item shapes in the config's input order: requests batch together
        only if they send the same inputs with the same shapes, whatever order they list
        them in and whichever optional inputs they leave out."""
        # A list comprehension, not a generator: this runs for every request.
        return tuple([(n, item_shapes[n]) for n in self._input_names if n in item_shapes])

    @functools.cached_property
    def _input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def output(self, name: str) -> TensorSpec | None:
        return self._outputs_by_name.get(name)


def read_model_config(model_dir: Path) -> mc.ModelConfig:
    """Parse <model_dir>/config.pbtxt; a missing file gives an empty config (auto-complete)."""
    path = model_dir / CONFIG_FILENAME
    config = mc.ModelConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as exc:
            raise ConfigError(str(path), _parse_error_field(str(exc)), str(exc)) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(str(path), "<file>", f"not UTF-8 text: {exc}") from None
    if not config.name:
        config.name = model_dir.name
    return config


def _parse_error_field(message: str) -> str:
    # protobuf's message reads: '3:5 : Message type "inference.ModelConfig" has no field named "x".'
    if "field named" in message:
        return message.rsplit("field named", 1)[1].strip(' ".')
    return message.split(" ", 1)[0]


def infer_backend(config: mc.ModelConfig, version_dirs: list[Path]) -> str | None:
    """The backend a config asks for, or the one its model files imply."""
    if config.backend:
        return config.backend
    if config.platform:
        return PLATFORM_TO_BACKEND.get(config.platform)
    for version_dir in version_dirs:
        for backend, filename in DEFAULT_MODEL_FILENAME.items():
            # Executing model.py must be asked for by name, never inferred.
            if filename != "model.py" and (version_dir / filename).exists():
                return backend
    return None


def validate_model_config(config: mc.ModelConfig, path: str, dir_name: str) -> ModelSpec:
    """Check a parsed (and auto-completed) config; ConfigError names the field at fault."""
    if config.name != dir_name:
        raise ConfigError(
            path, "name", f"'{config.name}' differs from the model directory '{dir_name}'"
        )
    if config.HasField("sequence_batching"):
        # Serving it with the plain batcher would silently break its semantics.
        raise ConfigError(path, "sequence_batching", "is not supported by Convoy yet")
    if config.platform == ENSEMBLE or config.HasField("ensemble_scheduling"):
        return _ensemble_spec(config, path)
    backend = config.backend or PLATFORM_TO_BACKEND.get(config.platform, "")
    if backend not in DEFAULT_MODEL_FILENAME:
        raise ConfigError(
            path,
            "backend" if config.backend else "platform",
            f"unsupported backend '{config.backend or config.platform}'; "
            f"expected one of {sorted(DEFAULT_MODEL_FILENAME)} "
            f"or platforms {sorted(PLATFORM_TO_BACKEND)}",
        )
    if config.max_batch_size < 0:
        raise ConfigError(path, "max_batch_size", f"must be >= 0, got {config.max_batch_size}")
    inputs = _tensor_specs(config.input, path, "input")
    outputs = _tensor_specs(config.output, path, "output")
    if not inputs:
        raise ConfigError(path, "input", "the model declares no inputs")
    if not outputs:
        raise ConfigError(path, "output", "the model declares no outputs")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    _check_slo(parameters, config, path)
    _check_positive(parameters, path, TIMEOUT_PARAMETER)
    _check_positive(parameters, path, SPILL_PARAMETER)
    _check_softmax(parameters, outputs, path)
    _check_bf16(backend, inputs, outputs, path)
    options = backend_options(parameters, backend, config, inputs, path)
    features = feature_spec(parameters, inputs, path)
    if features is not None:  # callers send entity keys, not the input the features fill
        inputs = features.caller_inputs
    return ModelSpec(
        name=config.name,
        backend=backend,
        platform=config.platform or BACKEND_TO_PLATFORM.get(backend, backend),
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        batching=_batching(config, path),
        instance_groups=_instance_groups(config, path),
        version_policy=version_policy_of(config, path),
        default_model_filename=config.default_model_filename or DEFAULT_MODEL_FILENAME[backend],
        parameters=parameters,
        optimization=_optimization(config, path),
        warmup=_warmup(config, inputs, path),
        options=options,
        response_cache=config.response_cache.enable,
        capture=capture_spec(parameters, inputs, path),
        features=features,
    )


def _ensemble_spec(config: mc.ModelConfig, path: str) -> ModelSpec:
    """platform "ensemble": the steps are checked against the models they name when the
    ensemble loads (repository/ensemble.py); here only what the file itself can show."""
    if config.platform != ENSEMBLE:
        raise ConfigError(path, "platform", 'ensemble_scheduling needs platform: "ensemble"')
    if not config.HasField("ensemble_scheduling") or not config.ensemble_scheduling.step:
        raise ConfigError(path, "ensemble_scheduling", "an ensemble needs at least one step")
    if config.max_batch_size < 0:
        raise ConfigError(path, "max_batch_size", f"must be >= 0, got {config.max_batch_size}")
    inputs = _tensor_specs(config.input, path, "input")
    outputs = _tensor_specs(config.output, path, "output")
    if not inputs or not outputs:
        raise ConfigError(path, "input" if not inputs else "output", "an ensemble declares both")
    steps = []
    for index, step in enumerate(config.ensemble_scheduling.step):
        field = f"ensemble_scheduling.step[{index}]"
        if not step.model_name:
            raise ConfigError(path, f"{field}.model_name", "is empty")
        if step.model_version < -1 or step.model_version == 0:
            raise ConfigError(
                path, f"{field}.model_version", f"{step.model_version} is not a version or -1"
            )
        if not step.input_map or not step.output_map:
            raise ConfigError(path, field, "a step needs an input_map and an output_map")
        steps.append(
            EnsembleStep(
                model=step.model_name,
                version=step.model_version,
                input_map=tuple(sorted(step.input_map.items())),
                output_map=tuple(sorted(step.output_map.items())),
            )
        )
    return ModelSpec(
        name=config.name,
        backend=ENSEMBLE,
        platform=ENSEMBLE,
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        batching=None,
        instance_groups=(),
        version_policy=version_policy_of(config, path),
        default_model_filename="",
        parameters={key: value.string_value for key, value in config.parameters.items()},
        ensemble=tuple(steps),
    )


# Runtimes that compute in bfloat16: the others would get raw 16-bit patterns.
BF16_BACKENDS = ("pytorch", "tensorrt")


def _check_bf16(
    backend: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], path: str
) -> None:
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for tensor in tensors:
            if tensor.datatype == "BF16" and backend not in BF16_BACKENDS:
                raise ConfigError(
                    path,
                    f"{kind} '{tensor.name}'.data_type",
                    f"TYPE_BF16 needs a backend that computes in bfloat16 "
                    f"({', '.join(BF16_BACKENDS)}), not '{backend}'",
                )


def capture_spec(
    parameters: dict[str, str], inputs: tuple[TensorSpec, ...], path: str
) -> CaptureSpec | None:
    """parameters capture_*; ConfigError names the parameter at fault. A sample rate of
    0 or none: no capture (the other keys are still checked)."""

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(path, f"parameters.{key}", message)

    text = parameters.get(CAPTURE_SAMPLE_RATE, "0")
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise fail(CAPTURE_SAMPLE_RATE, f"'{text}' is not a fraction between 0 and 1")
    by = parameters.get(CAPTURE_BY, "random")
    if by not in CAPTURE_BY_VALUES:
        raise fail(CAPTURE_BY, f"'{by}' is not one of {', '.join(CAPTURE_BY_VALUES)}")
    outputs = parameters.get(CAPTURE_OUTPUTS, "true").strip().lower()
    if outputs not in ("true", "false"):
        raise fail(CAPTURE_OUTPUTS, f"'{outputs}' is not true or false")
    names = {t.name for t in inputs}
    chosen: dict[str, frozenset[str]] = {}
    for key in (CAPTURE_EXCLUDE, CAPTURE_HASH):
        chosen[key] = _names(parameters.get(key, ""))
        unknown = sorted(chosen[key] - names)
        if unknown:
            raise fail(key, f"the model has no input(s) {unknown}")
    if rate == 0.0:
        return None
    return CaptureSpec(rate, by, outputs == "true", chosen[CAPTURE_EXCLUDE], chosen[CAPTURE_HASH])


FEAST_REPO = "feast_repo"
FEAST_FEATURES = "feast_features"
FEAST_SERVICE = "feast_feature_service"
FEAST_ENTITIES = "feast_entities"
FEAST_OUTPUT = "feast_output"
FEAST_MISSING = "feast_missing"
FEAST_KEYS = (
    FEAST_REPO,
    FEAST_FEATURES,
    FEAST_SERVICE,
    FEAST_ENTITIES,
    FEAST_OUTPUT,
    FEAST_MISSING,
)
FEATURE_TIMESTAMP_SUFFIX = "__ts"  # a captured feature's timestamp field (Feast's own suffix)
_FLOATS = ("FP16", "FP32", "FP64")
_FEATURE_DATATYPES = (*_FLOATS, "INT32", "INT64")


@dataclass(frozen=True)
class FeatureSpec:
    """parameters feast_*: a model input filled from a Feast feature store, per batch, with
    features looked up by entity keys the request carries (docs/features.md). The Feast
    repository itself is opened at load (convoy/features/), where a feature service's
    features and the entities' key types become known."""

    repo: str  # a directory with feature_store.yaml, relative to the model directory
    features: tuple[str, ...]  # "view:feature" references; () when a service names them
    service: str | None
    entities: tuple[tuple[str, str], ...]  # (Feast join key, the request input carrying it)
    output: TensorSpec  # the model input the features fill, concatenated in declared order
    missing: str  # error | default | nan
    default: float
    model_inputs: tuple[TensorSpec, ...]  # what the runtime takes (config.pbtxt's inputs)
    caller_inputs: tuple[TensorSpec, ...]  # what callers send: entity keys, not `output`

    @property
    def names(self) -> tuple[str, ...]:
        """The features' own names (past "view:"), as capture and skew name them."""
        return tuple(ref.split(":", 1)[1] for ref in self.features)

    @property
    def captured(self) -> tuple[TensorSpec, ...]:
        """Each feature as the model saw it, and its feature timestamp (UTC µs; 0: none)."""
        specs: list[TensorSpec] = []
        for name in self.names:
            specs.append(TensorSpec(name, self.output.datatype, (1,)))
            specs.append(TensorSpec(name + FEATURE_TIMESTAMP_SUFFIX, "INT64", (1,)))
        return tuple(specs)

    def with_features(self, references: tuple[str, ...], path: str) -> FeatureSpec:
        """The features a service named (at load), checked like declared ones."""
        _check_feature_refs(references, self.output, self.caller_inputs, path)
        return replace(self, features=references)


def feature_spec(
    parameters: dict[str, str], inputs: tuple[TensorSpec, ...], path: str
) -> FeatureSpec | None:
    """parameters feast_*; ConfigError names the parameter at fault. None without
    feast_repo (and then no other feast_* key may be set)."""

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(path, f"parameters.{key}", message)

    repo = parameters.get(FEAST_REPO, "").strip()
    if not repo:
        for key in FEAST_KEYS:
            if key in parameters:
                raise fail(key, f"has no effect without parameters.{FEAST_REPO}")
        return None
    if Path(repo).is_absolute() or ".." in Path(repo).parts:
        raise fail(FEAST_REPO, f"'{repo}' must be a directory inside the model directory")
    refs = tuple(r.strip() for r in parameters.get(FEAST_FEATURES, "").split(",") if r.strip())
    service = parameters.get(FEAST_SERVICE, "").strip() or None
    if bool(refs) == bool(service):
        raise fail(FEAST_FEATURES, f"give either {FEAST_FEATURES} or {FEAST_SERVICE}")
    by_name = {t.name: t for t in inputs}
    output_name = parameters.get(FEAST_OUTPUT, "").strip()
    output = by_name.get(output_name)
    if output is None:
        raise fail(FEAST_OUTPUT, f"'{output_name}' is not an input of the model")
    if output.datatype not in _FEATURE_DATATYPES or len(output.dims) != 1:
        raise fail(
            FEAST_OUTPUT,
            f"input '{output_name}' must be one of {list(_FEATURE_DATATYPES)} with dims "
            f"[ N ] (N features), got {output.datatype} {list(output.dims)}",
        )
    entities: list[tuple[str, str]] = []
    for pair in parameters.get(FEAST_ENTITIES, "").split(","):
        key, _, name = pair.strip().partition(":")
        if not key.strip() or not name.strip():
            raise fail(FEAST_ENTITIES, f"'{pair.strip()}' is not an entity_key:INPUT pair")
        entities.append((key.strip(), name.strip()))
    entity_inputs: list[TensorSpec] = []
    for _, name in entities:
        if name == output_name:
            raise fail(FEAST_ENTITIES, f"input '{name}' is the one the features fill")
        declared = by_name.get(name, TensorSpec(name, "INT64", (1,)))
        if declared.datatype not in ("INT64", "BYTES") or declared.dims != (1,):
            raise fail(
                FEAST_ENTITIES,
                f"entity input '{name}' must be INT64 or BYTES (TYPE_STRING) with dims [ 1 ]",
            )
        entity_inputs.append(replace(declared, optional=False))
    if len({name for _, name in entities}) != len(entities):
        raise fail(FEAST_ENTITIES, "each entity needs an input of its own")
    missing, default = _missing_policy(parameters.get(FEAST_MISSING, "error"), output, fail)
    entity_names = {name for _, name in entities}
    model_inputs = tuple(t for t in inputs if t.name not in entity_names)
    caller = tuple(t for t in model_inputs if t.name != output_name) + tuple(entity_inputs)
    spec = FeatureSpec(
        repo=repo, features=(), service=service, entities=tuple(entities), output=output,
        missing=missing, default=default, model_inputs=model_inputs, caller_inputs=caller,
    )  # fmt: skip
    return spec.with_features(refs, path) if refs else spec


def _missing_policy(
    text: str, output: TensorSpec, fail: Callable[[str, str], ConfigError]
) -> tuple[str, float]:
    policy, _, value = text.strip().partition(":")
    if policy == "error" and not value:
        return "error", 0.0
    if policy == "nan" and not value:
        if output.datatype not in _FLOATS:
            raise fail(
                FEAST_MISSING, f"nan needs a floating input, '{output.name}' is {output.datatype}"
            )
        return "nan", math.nan
    if policy == "default":
        try:
            number = float(value)
        except ValueError:
            raise fail(FEAST_MISSING, f"'{value}' is not a number (default:<value>)") from None
        if output.datatype not in _FLOATS and not number.is_integer():
            raise fail(
                FEAST_MISSING, f"'{value}' does not fit input '{output.name}' ({output.datatype})"
            )
        return "default", number
    raise fail(FEAST_MISSING, f"'{text}' is not one of error, default:<value>, nan")


def _check_feature_refs(
    refs: tuple[str, ...], output: TensorSpec, inputs: tuple[TensorSpec, ...], path: str
) -> None:
    key = f"parameters.{FEAST_FEATURES}"
    names: list[str] = []
    for ref in refs:
        view, _, name = ref.partition(":")
        if not view or not name or ":" in name:
            raise ConfigError(path, key, f"'{ref}' is not a view:feature reference")
        names.append(name)
    fields = {*names, *(n + FEATURE_TIMESTAMP_SUFFIX for n in names)}  # captured beside inputs
    clashes = sorted({n for n in names if names.count(n) > 1} | ({t.name for t in inputs} & fields))
    if clashes:
        raise ConfigError(path, key, f"feature names {clashes} are not unique among the inputs")
    if output.dims[0] not in (-1, len(refs)):
        raise ConfigError(
            path, f"parameters.{FEAST_OUTPUT}",
            f"input '{output.name}' has dims {list(output.dims)}, but {len(refs)} features fill it",
        )  # fmt: skip


def _check_positive(parameters: dict[str, str], path: str, key: str) -> None:
    value = parameters.get(key)
    if value is None:
        return
    try:
        ok = float(value) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(path, f"parameters.{key}", f"'{value}' is not a positive number")


def _names(text: str) -> frozenset[str]:
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def _check_softmax(parameters: dict[str, str], outputs: tuple[TensorSpec, ...], path: str) -> None:
    field = f"parameters.{SOFTMAX_PARAMETER}"
    names = _names(parameters.get(SOFTMAX_PARAMETER, ""))
    if SOFTMAX_PARAMETER in parameters and not names:
        raise ConfigError(path, field, "list the outputs to rank by softmax, e.g. 'LOGITS'")
    by_name = {t.name: t for t in outputs}
    for name in sorted(names):
        if name not in by_name:
            raise ConfigError(path, field, f"'{name}' is not an output of the model")
        if by_name[name].datatype == "BYTES":
            raise ConfigError(path, field, f"output '{name}' is BYTES; softmax needs numbers")


def backend_options(
    parameters: dict[str, str],
    backend: str,
    config: mc.ModelConfig,
    inputs: tuple[TensorSpec, ...],
    path: str,
) -> BackendOptions:
    """The runtimes' parameters of one config, typed; ConfigError names `parameters.<key>`.
    Keys a backend does not read are not checked for it (a "precision" meant for
    PyTorch means nothing to ONNX Runtime, and Triton users may use the name)."""
    read = _ParameterReader(parameters, path)
    options = BackendOptions(
        image=_image_options(read, inputs),
        text=_text_options(read, inputs),
        softmax_outputs=_names(parameters.get(SOFTMAX_PARAMETER, "")),
    )
    if backend == "pytorch":
        options = replace(
            options,
            precision=read.choice("precision", PYTORCH_PRECISIONS, "fp32"),
            cuda_graph_batch_sizes=_graph_sizes(read, config, inputs, options.text is not None),
        )
    elif backend == "onnxruntime":
        threads = read.integer("intra_op_thread_count", 0, minimum=None)
        options = replace(options, intra_op_thread_count=threads if threads > 0 else None)
    elif backend == "tensorrt":
        options = replace(options, tensorrt=_tensorrt_options(read))
    return options


@dataclass(frozen=True)
class _ParameterReader:
    parameters: dict[str, str]
    path: str

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, f"parameters.{key}", message)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.parameters.get(key, default)
        if value not in allowed:
            raise self.error(key, f"'{value}' is not one of {list(allowed)}")
        return value

    def integer(self, key: str, default: int, minimum: int | None = 1) -> int:
        text = self.parameters.get(key)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise self.error(key, f"'{text}' is not an integer") from None
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def numbers(self, key: str, kind: type[float] | type[int]) -> tuple[Any, ...] | None:
        text = self.parameters.get(key)
        if text is None:
            return None
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            message = f"'{text}' is not a comma-separated list of {kind.__name__}s"
            raise self.error(key, message) from None

    def path_in_version(self, key: str) -> str | None:
        text = self.parameters.get(key)
        if text is None:
            return None
        if not text or text.startswith("/") or ".." in Path(text).parts:
            raise self.error(key, f"'{text}' must name a path inside the version directory")
        return text


def _image_options(read: _ParameterReader, inputs: tuple[TensorSpec, ...]) -> ImageOptions | None:
    if "preprocess" not in read.parameters:
        for key in ("preprocess_mean", "preprocess_std"):
            if key in read.parameters:
                raise read.error(key, "has no effect without parameters.preprocess")
        return None
    read.choice("preprocess", PREPROCESSORS, "")
    images = [t for t in inputs if t.datatype == "UINT8" and len(t.dims) == 3]
    if len(images) != 1 or images[0].dims[-1] != 3:
        raise read.error("preprocess", "image_hwc_uint8 needs one UINT8 input of dims [H, W, 3]")
    mean = read.numbers("preprocess_mean", float) or IMAGENET_MEAN
    std = read.numbers("preprocess_std", float) or IMAGENET_STD
    for key, values in (("preprocess_mean", mean), ("preprocess_std", std)):
        if len(values) != 3:
            raise read.error(key, f"needs 3 values (one per channel), got {len(values)}")
    if min(std) <= 0:
        raise read.error("preprocess_std", "every value must be > 0")
    return ImageOptions(images[0].name, mean, std)


def _text_options(read: _ParameterReader, inputs: tuple[TensorSpec, ...]) -> TextOptions | None:
    tokenizer = read.path_in_version("tokenizer")
    if tokenizer is None:
        for key in ("tokenizer_max_length", "postprocess"):
            if key in read.parameters:
                raise read.error(key, "has no effect without parameters.tokenizer")
        return None
    texts = [t for t in inputs if t.datatype == "BYTES"]
    if len(texts) != 1 or texts[0].dims not in ((1,), ()):
        raise read.error("tokenizer", "a tokenized model needs exactly one BYTES input, dims [1]")
    post = read.parameters.get("postprocess")
    if post is not None:
        read.choice("postprocess", POSTPROCESSORS, "")
    return TextOptions(texts[0].name, tokenizer, read.integer("tokenizer_max_length", 256), post)


def _graph_sizes(
    read: _ParameterReader, config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], text: bool
) -> tuple[int, ...]:
    """PyTorch's CUDA graph buckets: parameters cuda_graph_batch_sizes, or Triton's
    optimization { cuda { graphs: true } } with its graph_spec batch sizes (without
    graph_spec: the preferred batch sizes and max_batch_size)."""
    field = "parameters.cuda_graph_batch_sizes"
    sizes = read.numbers("cuda_graph_batch_sizes", int)
    if sizes is None and config.optimization.cuda.graphs:
        field = "optimization.cuda.graphs"
        top = config.max_batch_size
        sizes = tuple(g.batch_size for g in config.optimization.cuda.graph_spec) or (
            *config.dynamic_batching.preferred_batch_size,
            top,
        )
        sizes = tuple(b for b in sizes if b > 0)
    if sizes is None:
        return ()
    top = config.max_batch_size
    if top < 1 or not sizes or min(sizes) < 1 or max(sizes) > top:
        raise ConfigError(read.path, field, f"sizes must lie in 1..max_batch_size ({top})")
    if any(-1 in t.dims for t in inputs):
        raise ConfigError(read.path, field, "CUDA graphs need fixed input dims past the batch")
    if text or any(t.datatype == "BYTES" for t in inputs):
        raise ConfigError(read.path, field, "CUDA graphs need fixed shapes; text varies in length")
    return tuple(sorted(set(sizes)))


def _tensorrt_options(read: _ParameterReader) -> TensorRTOptions:
    options = TensorRTOptions(
        precision=read.choice("trt_precision", TENSORRT_PRECISIONS, "fp16"),
        calibration_dir=read.path_in_version("trt_calibration_dir"),
        dynamic_min=read.integer("trt_dynamic_min", 1),
        dynamic_opt=read.integer("trt_dynamic_opt", 128),
        dynamic_max=read.integer("trt_dynamic_max", 512),
    )
    if not options.dynamic_min <= options.dynamic_opt <= options.dynamic_max:
        raise read.error(
            "trt_dynamic_*",
            f"need trt_dynamic_min <= trt_dynamic_opt <= trt_dynamic_max, got "
            f"{options.dynamic_min} <= {options.dynamic_opt} <= {options.dynamic_max}",
        )
    return options


def _check_slo(parameters: dict[str, str], config: mc.ModelConfig, path: str) -> None:
    value = parameters.get(SLO_PARAMETER)
    if value is None:
        return
    field = f"parameters.{SLO_PARAMETER}"
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(path, field, f"'{value}' is not a number of milliseconds") from None
    if not target > 0:
        raise ConfigError(path, field, f"must be > 0, got {value}")
    if config.max_batch_size <= 0 or not config.HasField("dynamic_batching"):
        raise ConfigError(path, field, "needs max_batch_size > 0 and dynamic_batching")


def _enum_name(enum: Any, number: int, path: str, field: str) -> str:
    # Text-format protobuf accepts any number for an (open) enum: name it or refuse it.
    try:
        return str(enum.Name(number))
    except ValueError:
        raise ConfigError(path, field, f"{number} is not one of {list(enum.keys())}") from None


def _tensor_specs(tensors: Iterable[Any], path: str, kind: str) -> tuple[TensorSpec, ...]:
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        where = f"{kind}[{index}]"
        if not tensor.name:
            raise ConfigError(path, f"{where}.name", "must not be empty")
        if tensor.name in seen:
            raise ConfigError(path, f"{where}.name", f"duplicate {kind} '{tensor.name}'")
        seen.add(tensor.name)
        type_name = _enum_name(mc.DataType, tensor.data_type, path, f"{where}.data_type")
        if type_name == "TYPE_INVALID":
            raise ConfigError(path, f"{where}.data_type", f"missing for {kind} '{tensor.name}'")
        dims = tuple(int(d) for d in tensor.dims)
        if tensor.HasField("reshape"):
            raise ConfigError(path, f"{where}.reshape", "reshape is not supported yet")
        for d in dims:
            if d == 0 or d < -1:
                raise ConfigError(
                    path, f"{where}.dims", f"{kind} '{tensor.name}' has invalid dim {d}"
                )
        specs.append(
            TensorSpec(
                name=tensor.name,
                datatype=CONFIG_TO_WIRE[type_name],
                dims=dims,
                optional=bool(getattr(tensor, "optional", False)),
                label_filename=getattr(tensor, "label_filename", ""),
            )
        )
    return tuple(specs)


def _queue_policy(policy: mc.ModelQueuePolicy, path: str, field: str) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=_enum_name(
            mc.ModelQueuePolicy.TimeoutAction,
            policy.timeout_action,
            path,
            f"dynamic_batching.{field}.timeout_action",
        ),
        default_timeout_us=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size,
    )


def _batching(config: mc.ModelConfig, path: str) -> BatchingConfig | None:
    if not config.HasField("dynamic_batching"):
        return None
    db = config.dynamic_batching
    if config.max_batch_size == 0:
        # Triton accepts this and runs requests one by one; so do we.
        log.warning("%s: dynamic_batching ignored because max_batch_size is 0", path)
    for i, size in enumerate(db.preferred_batch_size):
        if size <= 0 or (config.max_batch_size and size > config.max_batch_size):
            raise ConfigError(
                path,
                f"dynamic_batching.preferred_batch_size[{i}]",
                f"{size} must be in 1..max_batch_size ({config.max_batch_size})",
            )
    levels = db.priority_levels
    if levels and not 1 <= db.default_priority_level <= levels:
        raise ConfigError(
            path,
            "dynamic_batching.default_priority_level",
            f"{db.default_priority_level} must be in 1..priority_levels ({levels})",
        )
    for level in db.priority_queue_policy:
        if not 1 <= level <= levels:
            raise ConfigError(
                path,
                "dynamic_batching.priority_queue_policy",
                f"level {level} must be in 1..priority_levels ({levels})",
            )
    return BatchingConfig(
        max_queue_delay_us=db.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(sorted(set(db.preferred_batch_size))),
        preserve_ordering=db.preserve_ordering,
        priority_levels=levels,
        default_priority_level=db.default_priority_level,
        default_queue_policy=_queue_policy(db.default_queue_policy, path, "default_queue_policy"),
        priority_queue_policies={
            int(level): _queue_policy(policy, path, f"priority_queue_policy[{level}]")
            for level, policy in db.priority_queue_policy.items()
        },
    )


def _warmup(
    config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], path: str
) -> tuple[WarmupSample, ...]:
    by_name = {t.name: t for t in inputs}
    samples = []
    for i, sample in enumerate(config.model_warmup):
        where = f"model_warmup[{i}]"
        batched = config.max_batch_size > 0
        if batched and not 1 <= sample.batch_size <= config.max_batch_size:
            raise ConfigError(
                path,
                f"{where}.batch_size",
                f"must lie in 1..max_batch_size ({config.max_batch_size}), got {sample.batch_size}",
            )
        if not batched and sample.batch_size > 1:
            raise ConfigError(path, f"{where}.batch_size", "a model without batching takes 1")
        missing = [t.name for t in inputs if not t.optional and t.name not in sample.inputs]
        if missing:
            raise ConfigError(path, f"{where}.inputs", f"missing the model's inputs {missing}")
        warm: dict[str, WarmupInput] = {}
        for name, given in sample.inputs.items():
            field = f"{where}.inputs[{name}]"
            model_input = by_name.get(name)
            if model_input is None:
                raise ConfigError(path, field, f"'{name}' is not an input of the model")
            type_name = _enum_name(mc.DataType, given.data_type, path, f"{field}.data_type")
            datatype = CONFIG_TO_WIRE.get(type_name)
            if datatype != model_input.datatype:
                raise ConfigError(
                    path, f"{field}.data_type", f"{type_name} differs from the input's type"
                )
            dims = tuple(int(d) for d in given.dims)
            if -1 in dims or not model_input.matches(dims):
                raise ConfigError(
                    path, f"{field}.dims", f"{list(dims)} does not fit {list(model_input.dims)}"
                )
            choice = given.WhichOneof("input_data_type")
            if choice is None:
                raise ConfigError(path, field, "needs zero_data, random_data or input_data_file")
            file = given.input_data_file
            if choice == "input_data_file" and (not file or "/" in file or file.startswith(".")):
                raise ConfigError(
                    path, f"{field}.input_data_file", "must name a file in warmup/, no path"
                )
            source = {"zero_data": "zero", "random_data": "random"}.get(choice, "file")
            warm[name] = WarmupInput(datatype, dims, source, file)
        samples.append(
            WarmupSample(sample.name or where, sample.batch_size, warm, max(1, sample.count))
        )
    return tuple(samples)


def _optimization(config: mc.ModelConfig, path: str) -> Optimization:
    accelerators = config.optimization.execution_accelerators
    level = config.optimization.graph.level
    if level not in (-1, 0, 1, 2):
        raise ConfigError(path, "optimization.graph.level", f"must be -1, 0, 1 or 2, got {level}")
    return Optimization(
        cuda=_cuda_options(config, path),
        gpu_accelerators=tuple(
            Accelerator(a.name, dict(a.parameters)) for a in accelerators.gpu_execution_accelerator
        ),
        cpu_accelerators=tuple(
            Accelerator(a.name, dict(a.parameters)) for a in accelerators.cpu_execution_accelerator
        ),
        graph_level=level,
    )


def _cuda_options(config: mc.ModelConfig, path: str) -> CudaOptions:
    cuda = config.optimization.cuda
    sizes = tuple(sorted({spec.batch_size for spec in cuda.graph_spec}))
    for i, spec in enumerate(cuda.graph_spec):
        if spec.batch_size < 0 or (
            config.max_batch_size and spec.batch_size > config.max_batch_size
        ):
            raise ConfigError(
                path,
                f"optimization.cuda.graph_spec[{i}].batch_size",
                f"must lie in 0..max_batch_size ({config.max_batch_size}), got {spec.batch_size}",
            )
    return CudaOptions(
        graphs=cuda.graphs,
        graph_batch_sizes=tuple(b for b in sizes if b > 0),
        busy_wait_events=cuda.busy_wait_events,
    )


def _instance_groups(config: mc.ModelConfig, path: str) -> tuple[InstanceGroupSpec, ...]:
    groups: list[InstanceGroupSpec] = []
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            raise ConfigError(
                path, f"instance_group[{i}].count", f"must be >= 0, got {group.count}"
            )
        groups.append(
            InstanceGroupSpec(
                name=group.name or f"{config.name}_{i}",
                kind=_enum_name(
                    mc.ModelInstanceGroup.Kind, group.kind, path, f"instance_group[{i}].kind"
                ),
                count=group.count or 1,
                gpus=tuple(group.gpus),
            )
        )
    if not groups:
        # As Triton: one instance on each GPU where there are GPUs, else one on the CPU.
        groups.append(InstanceGroupSpec(name=f"{config.name}_0", kind="KIND_AUTO", count=1))
    return tuple(groups)


def version_policy_of(config: mc.ModelConfig, path: str) -> VersionPolicy:
    if not config.HasField("version_policy"):
        return VersionPolicy()
    choice = config.version_policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(kind="all")
    if choice == "specific":
        versions = tuple(config.version_policy.specific.versions)
        if not versions:
            raise ConfigError(path, "version_policy.specific.versions", "must list a version")
        return VersionPolicy(kind="specific", versions=versions)
    num = config.version_policy.latest.num_versions
    if num < 1:
        raise ConfigError(path, "version_policy.latest.num_versions", "must be >= 1")
    return VersionPolicy(kind="latest", num_versions=num)
