from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "id", "class_index", "value", "class_label")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABEL_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    id: str
    class_index: int
    value: float
    class_label: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., id: _Optional[str] = ..., class_index: _Optional[int] = ..., value: _Optional[float] = ..., class_label: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("model_version", "correct", "error", "rolling", "window")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    correct: bool
    error: float
    rolling: float
    window: int
    def __init__(self, model_version: _Optional[str] = ..., correct: _Optional[bool] = ..., error: _Optional[float] = ..., rolling: _Optional[float] = ..., window: _Optional[int] = ...) -> None: ...

class DriftStatusRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class DriftHistogram(_message.Message):
    __slots__ = ("labels", "reference", "current", "edges")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    reference: _containers.RepeatedScalarFieldContainer[float]
    current: _containers.RepeatedScalarFieldContainer[float]
    edges: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., reference: _Optional[_Iterable[float]] = ..., current: _Optional[_Iterable[float]] = ..., edges: _Optional[_Iterable[float]] = ...) -> None: ...

class FeatureDriftFigures(_message.Message):
    __slots__ = ("name", "p_value", "distance", "drift", "histogram")
    NAME_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    p_value: float
    distance: float
    drift: bool
    histogram: DriftHistogram
    def __init__(self, name: _Optional[str] = ..., p_value: _Optional[float] = ..., distance: _Optional[float] = ..., drift: _Optional[bool] = ..., histogram: _Optional[_Union[DriftHistogram, _Mapping]] = ...) -> None: ...

class TensorDriftFigures(_message.Message):
    __slots__ = ("model_version", "name", "is_output", "test", "state", "reference_size", "windows", "alarms", "drift", "p_value", "distance", "threshold", "window_size", "age_seconds", "features", "histogram")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    name: str
    is_output: bool
    test: str
    state: str
    reference_size: int
    windows: int
    alarms: int
    drift: bool
    p_value: float
    distance: float
    threshold: float
    window_size: int
    age_seconds: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDriftFigures]
    histogram: DriftHistogram
    def __init__(self, model_version: _Optional[str] = ..., name: _Optional[str] = ..., is_output: _Optional[bool] = ..., test: _Optional[str] = ..., state: _Optional[str] = ..., reference_size: _Optional[int] = ..., windows: _Optional[int] = ..., alarms: _Optional[int] = ..., drift: _Optional[bool] = ..., p_value: _Optional[float] = ..., distance: _Optional[float] = ..., threshold: _Optional[float] = ..., window_size: _Optional[int] = ..., age_seconds: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDriftFigures, _Mapping]]] = ..., histogram: _Optional[_Union[DriftHistogram, _Mapping]] = ...) -> None: ...

class FeedbackFigures(_message.Message):
    __slots__ = ("model_version", "task", "window", "has_rolling", "rolling", "has_reference", "reference", "accepted")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    HAS_ROLLING_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    HAS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    task: str
    window: int
    has_rolling: bool
    rolling: float
    has_reference: bool
    reference: float
    accepted: int
    def __init__(self, model_version: _Optional[str] = ..., task: _Optional[str] = ..., window: _Optional[int] = ..., has_rolling: _Optional[bool] = ..., rolling: _Optional[float] = ..., has_reference: _Optional[bool] = ..., reference: _Optional[float] = ..., accepted: _Optional[int] = ...) -> None: ...

class DriftStatusResponse(_message.Message):
    __slots__ = ("model_name", "reference", "tensors", "feedback")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    reference: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDriftFigures]
    feedback: _containers.RepeatedCompositeFieldContainer[FeedbackFigures]
    def __init__(self, model_name: _Optional[str] = ..., reference: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorDriftFigures, _Mapping]]] = ..., feedback: _Optional[_Iterable[_Union[FeedbackFigures, _Mapping]]] = ...) -> None: ...
