"""convoy.admin.MonitoringService on grpc.aio: decode -> Monitors -> encode.

No statistics and no decisions here: feedback is judged by the model's
FeedbackStore, drift figures come from the monitors' latest windows. Errors map to
gRPC codes in status.py, as for inference.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from ..errors import ConvoyError, InvalidInput, ModelNotFound
from ..monitoring.detectors import Histogram
from ..monitoring.feedback import FeedbackLabel, VersionFeedback
from ..monitoring.monitor import MonitorStatus, TensorStatus
from ..monitoring.registry import Monitors
from ..pb import convoy_monitoring_pb2 as pb
from ..pb import convoy_monitoring_pb2_grpc as pb_grpc
from .status import status_code

# (model, version that answered, request id, label): an accepted label, e.g. to capture it.
LabelSink = Callable[[str, str, str, FeedbackLabel], None]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MonitoringService"].full_name


class MonitoringServicer(pb_grpc.MonitoringServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        monitors: Monitors,
        clock: Callable[[], float] = time.monotonic,
        on_label: LabelSink | None = None,
    ) -> None:
        """`clock`: the monitors' clock, for the age of the latest figures; `on_label`:
        told of each accepted label (the capture's LabelRecorder)."""
        self._monitors = monitors
        self._clock = clock
        self._on_label = on_label

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        try:
            label = _label(request)
            outcome = self._monitors.feedback(
                request.model_name, request.id, label, request.model_version
            )
        except ConvoyError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        if self._on_label is not None:
            self._on_label(request.model_name, outcome.version, request.id, label)
        return pb.FeedbackResponse(
            model_version=outcome.version,
            correct=bool(outcome.correct),
            error=outcome.error or 0.0,
            rolling=outcome.rolling,
            window=outcome.window,
        )

    async def DriftStatus(
        self, request: pb.DriftStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.DriftStatusResponse:
        try:
            return self._status(request.model_name, request.model_version)
        except ConvoyError as exc:
            await context.abort(status_code(exc), exc.message)
            raise

    def _status(self, model: str, version: str) -> pb.DriftStatusResponse:
        monitors = [m for m in self._monitors.monitors(model) if version in ("", m.version)]
        store = self._monitors.feedback_store(model)
        figures = [f for f in (store.figures() if store else []) if version in ("", f.version)]
        if not monitors and store is None:
            which = f"model '{model}'" + (f" version {version}" if version else "")
            raise ModelNotFound(
                f"{which} is not monitored: not loaded, or no drift_reference / feedback_* "
                "parameter in its config.pbtxt"
            )
        response = pb.DriftStatusResponse(model_name=model)
        now = self._clock()
        for monitor in monitors:
            status = monitor.status()
            response.reference = status.reference
            for tensor in status.tensors:
                _encode_tensor(response.tensors.add(), status, tensor, now)
        for figure in figures:
            _encode_feedback(response.feedback.add(), figure)
        return response


def _label(request: pb.FeedbackRequest) -> FeedbackLabel:
    which = request.WhichOneof("label")
    if which == "class_index":
        return int(request.class_index)
    if which == "value":
        return float(request.value)
    if which == "class_label":
        return str(request.class_label)
    raise InvalidInput("feedback needs a label: class_index, value or class_label")


def _encode_tensor(
    out: pb.TensorDriftFigures, status: MonitorStatus, tensor: TensorStatus, now: float
) -> None:
    out.model_version = status.version
    out.name = tensor.name
    out.is_output = tensor.is_output
    out.test = tensor.test
    out.state = tensor.state
    out.reference_size = tensor.reference_size
    out.windows = tensor.windows
    out.alarms = tensor.alarms
    result = tensor.result
    if result is None:
        return
    out.drift = result.is_drift
    out.p_value = result.p_value
    out.distance = result.distance
    out.threshold = result.threshold
    out.window_size = result.window_size
    if tensor.scored_at_s is not None:
        out.age_seconds = max(0.0, now - tensor.scored_at_s)
    if result.histogram is not None:
        _encode_histogram(out.histogram, result.histogram)
    for feature in result.features:
        f = out.features.add(
            name=feature.name,
            p_value=feature.p_value,
            distance=feature.distance,
            drift=feature.is_drift,
        )
        if feature.histogram is not None:
            _encode_histogram(f.histogram, feature.histogram)


def _encode_histogram(out: pb.DriftHistogram, histogram: Histogram) -> None:
    out.labels.extend(histogram.labels)
    out.reference.extend(histogram.reference)
    out.current.extend(histogram.current)
    out.edges.extend(histogram.edges)


def _encode_feedback(out: pb.FeedbackFigures, figure: VersionFeedback) -> None:
    out.model_version = figure.version
    out.task = figure.task
    out.window = figure.window
    out.accepted = figure.accepted
    if figure.rolling is not None:
        out.has_rolling = True
        out.rolling = figure.rolling
    if figure.reference is not None:
        out.has_reference = True
        out.reference = figure.reference


def add_monitoring_service(
    server: grpc.aio.Server,
    monitors: Monitors,
    clock: Callable[[], float] = time.monotonic,
    on_label: LabelSink | None = None,
) -> None:
    servicer = MonitoringServicer(monitors, clock, on_label)
    pb_grpc.add_MonitoringServiceServicer_to_server(servicer, server)
