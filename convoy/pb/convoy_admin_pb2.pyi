from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutGates(_message.Message):
    __slots__ = ("max_error_rate", "max_p99_ms", "max_queue_p99_ms", "max_divergence", "min_requests", "max_burn_rate")
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BURN_RATE_FIELD_NUMBER: _ClassVar[int]
    max_error_rate: float
    max_p99_ms: float
    max_queue_p99_ms: float
    max_divergence: float
    min_requests: int
    max_burn_rate: float
    def __init__(self, max_error_rate: _Optional[float] = ..., max_p99_ms: _Optional[float] = ..., max_queue_p99_ms: _Optional[float] = ..., max_divergence: _Optional[float] = ..., min_requests: _Optional[int] = ..., max_burn_rate: _Optional[float] = ...) -> None: ...

class RolloutSpec(_message.Message):
    __slots__ = ("strategy", "steps", "step_interval_s", "gates", "shadow_fraction", "keep_warm_s", "salt", "replay_since", "replay_until", "replay_max_diff_rate", "replay_max_requests")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    KEEP_WARM_S_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_SINCE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_UNTIL_FIELD_NUMBER: _ClassVar[int]
    REPLAY_MAX_DIFF_RATE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    steps: _containers.RepeatedScalarFieldContainer[float]
    step_interval_s: float
    gates: RolloutGates
    shadow_fraction: float
    keep_warm_s: float
    salt: str
    replay_since: str
    replay_until: str
    replay_max_diff_rate: float
    replay_max_requests: int
    def __init__(self, strategy: _Optional[str] = ..., steps: _Optional[_Iterable[float]] = ..., step_interval_s: _Optional[float] = ..., gates: _Optional[_Union[RolloutGates, _Mapping]] = ..., shadow_fraction: _Optional[float] = ..., keep_warm_s: _Optional[float] = ..., salt: _Optional[str] = ..., replay_since: _Optional[str] = ..., replay_until: _Optional[str] = ..., replay_max_diff_rate: _Optional[float] = ..., replay_max_requests: _Optional[int] = ...) -> None: ...

class WindowStats(_message.Message):
    __slots__ = ("requests", "errors", "error_rate", "queue_p99_ms", "compute_p99_ms", "compared", "max_divergence", "top1_agreement", "shadow_shed", "burn_rate", "burn_slo")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    MAX_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHED_FIELD_NUMBER: _ClassVar[int]
    BURN_RATE_FIELD_NUMBER: _ClassVar[int]
    BURN_SLO_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    error_rate: float
    queue_p99_ms: float
    compute_p99_ms: float
    compared: int
    max_divergence: float
    top1_agreement: float
    shadow_shed: int
    burn_rate: float
    burn_slo: str
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., queue_p99_ms: _Optional[float] = ..., compute_p99_ms: _Optional[float] = ..., compared: _Optional[int] = ..., max_divergence: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., shadow_shed: _Optional[int] = ..., burn_rate: _Optional[float] = ..., burn_slo: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("model", "strategy", "phase", "stable", "candidate", "weights", "reason", "analysis", "step", "steps", "shadow_fraction", "windows", "replay")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class WindowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: WindowStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[WindowStats, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    model: str
    strategy: str
    phase: str
    stable: str
    candidate: str
    weights: _containers.ScalarMap[str, float]
    reason: str
    analysis: str
    step: int
    steps: _containers.RepeatedScalarFieldContainer[float]
    shadow_fraction: float
    windows: _containers.MessageMap[str, WindowStats]
    replay: str
    def __init__(self, model: _Optional[str] = ..., strategy: _Optional[str] = ..., phase: _Optional[str] = ..., stable: _Optional[str] = ..., candidate: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., reason: _Optional[str] = ..., analysis: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[_Iterable[float]] = ..., shadow_fraction: _Optional[float] = ..., windows: _Optional[_Mapping[str, WindowStats]] = ..., replay: _Optional[str] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("model", "version", "spec")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    spec: RolloutSpec
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., spec: _Optional[_Union[RolloutSpec, _Mapping]] = ...) -> None: ...

class RolloutStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutStatusResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutStatus]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutStatus, _Mapping]]] = ...) -> None: ...

class RolloutModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class SetRolloutWeightRequest(_message.Message):
    __slots__ = ("model", "candidate_percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    candidate_percent: float
    def __init__(self, model: _Optional[str] = ..., candidate_percent: _Optional[float] = ...) -> None: ...
