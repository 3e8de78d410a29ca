"""CaptureRecorder: the inference path's answer observer that samples, copies and
buffers a row per captured request (on the event loop: a few copies, no I/O).
LabelRecorder: the Feedback RPC's accepted labels, buffered the same way."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import CaptureSpec, ModelSpec
from ..errors import ConvoyError
from ..inference.path import Answered
from .rows import CapturedRow, hashed
from .writer import CaptureWriter

log = logging.getLogger(__name__)

# Each row costs this much besides its tensors (strings, numbers, the object itself).
ROW_OVERHEAD_BYTES = 512


def sampled(spec: CaptureSpec, answered: Answered, draw: Callable[[], float]) -> bool:
    """Random, or by a hash of the request id or A/B key: one key always in or out."""
    if spec.sample_rate >= 1.0:
        return True
    if spec.by == "random":
        return draw() < spec.sample_rate
    key = answered.ab_key() if spec.by == "ab_key" else answered.request_id
    if not key:  # nothing to hash by: sampled at random, as Triton's tracing does
        return draw() < spec.sample_rate
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < spec.sample_rate


class CaptureRecorder:
    def __init__(
        self,
        writer: CaptureWriter,
        status_of: Callable[[ConvoyError], str],
        draw: Callable[[], float] | None = None,
        wall_clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        self._writer = writer
        self._status_of = status_of  # the gRPC code name of an error (api/status.py)
        self._draw = draw or np.random.default_rng().random
        self._now_us = wall_clock_us

    def __call__(self, answered: Answered) -> None:
        spec = answered.served.spec
        capture = spec.capture
        if capture is None or not sampled(capture, answered, self._draw):
            return
        row = self._row(answered, capture)
        self._writer.put(row)  # False: dropped and counted by the writer

    def _row(self, answered: Answered, capture: CaptureSpec) -> CapturedRow:
        request, result, error = answered.request, answered.result, answered.error
        inputs: dict[str, np.ndarray[Any, Any]] = {}
        outputs: dict[str, np.ndarray[Any, Any]] = {}
        queue_us = compute_us = total_us = None
        nbytes = ROW_OVERHEAD_BYTES  # summed as it goes: this runs on the loop per request
        if request is not None:
            for name, value in request.inputs.items():
                if name in capture.exclude:
                    continue
                if name in capture.hashed:
                    kept = hashed(value, self._writer.salt)
                else:  # a copy: the request's buffers (a front end's ring) are reused
                    kept = np.array(value, copy=True)
                inputs[name] = kept
                nbytes += _size(kept)
            arrival, dispatch = request.arrival_ns, request.dispatch_ns
            if arrival:
                total_us = (answered.done_ns - arrival) // 1000
                if dispatch:
                    queue_us = (dispatch - arrival) // 1000
                    compute_us = (answered.done_ns - dispatch) // 1000
        if result is not None:  # features looked up for it: what the model saw
            for name, value in result.added_inputs.items():
                inputs[name] = value  # the lookup's own arrays, made per batch: no copy
                nbytes += _size(value)
        if result is not None and capture.outputs:
            for name, value in result.outputs.items():
                kept = outputs[name] = np.array(value, copy=True)
                nbytes += _size(kept)
        return CapturedRow(
            spec=answered.served.spec,
            version=answered.served.version_label,
            request_id=answered.request_id,  # "" gets an id on the writer's thread (rows.py)
            timestamp_us=self._now_us(),
            arm=answered.arm,
            transport=answered.transport,
            status="OK" if error is None else self._status_of(error),
            error=None if error is None else error.message,
            queue_us=queue_us,
            compute_us=compute_us,
            total_us=total_us,
            cache_hit=answered.cache_hit,
            client=answered.client,
            inputs=inputs,
            outputs=outputs,
            nbytes=nbytes,
        )


def _size(array: np.ndarray[Any, Any]) -> int:
    if array.dtype != object:
        return int(array.nbytes)
    return sum(len(x) if isinstance(x, bytes | str) else 8 for x in array.reshape(-1))


class LabelRecorder:
    """Each label the Feedback RPC accepted, buffered for <capture-dir>/labels/, for the
    models that capture: the config of the version that answered the request sets
    capture_sample_rate (that of the model's default version, if that one no longer
    serves). Every such label is kept, its request sampled or not: labels are small,
    and one whose request was not captured simply joins no row."""

    def __init__(
        self,
        writer: CaptureWriter,
        spec_of: Callable[[str, str], ModelSpec],
        wall_clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """`spec_of(model, version)`: the serving spec, ConvoyError when none serves
        ("" for the default version), as ModelRepository.get gives it."""
        self._writer = writer
        self._spec_of = spec_of
        self._now_us = wall_clock_us
        self.failures = 0

    def __call__(self, model: str, version: str, request_id: str, label: int | float | str) -> None:
        """On the event loop, after the feedback was judged. Never raises: the label was
        accepted, and the capture must not turn that into an error."""
        try:
            if self._captures(model, version):
                self._writer.put_label(model, request_id, label, self._now_us(), version)
        except Exception:
            self.failures += 1
            if self.failures == 1:
                log.exception("capture of a label of model '%s' failed", model)

    def _captures(self, model: str, version: str) -> bool:
        for which in dict.fromkeys((version, "")):
            try:
                return self._spec_of(model, which).capture is not None
            except ConvoyError:
                continue
        return False
