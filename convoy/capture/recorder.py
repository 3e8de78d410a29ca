"""CaptureRecorder: the inference path's answer observer that samples, copies and
buffers a row per captured request (on the event loop: a few copies, no I/O)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import CaptureSpec
from ..errors import ConvoyError
from ..inference.path import Answered
from .rows import CapturedRow, hashed
from .writer import CaptureWriter

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
        if request is not None:
            for name, value in request.inputs.items():
                if name in capture.exclude:
                    continue
                if name in capture.hashed:
                    inputs[name] = hashed(value, self._writer.salt)
                else:  # a copy: the request's buffers (a front end's ring) are reused
                    inputs[name] = np.array(value, copy=True)
            arrival, dispatch = request.arrival_ns, request.dispatch_ns
            if arrival:
                total_us = (answered.done_ns - arrival) // 1000
                if dispatch:
                    queue_us = (dispatch - arrival) // 1000
                    compute_us = (answered.done_ns - dispatch) // 1000
        if result is not None and capture.outputs:
            outputs = {k: np.array(v, copy=True) for k, v in result.outputs.items()}
        nbytes = ROW_OVERHEAD_BYTES + sum(_size(a) for a in (*inputs.values(), *outputs.values()))
        return CapturedRow(
            spec=answered.served.spec,
            version=answered.served.version_label,
            # A request without an id gets one: rows stay distinct (labels join by the id
            # the client sent, so a client that wants labels sends one).
            request_id=answered.request_id or uuid.uuid4().hex,
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
    if array.dtype == object:
        return sum(len(x) if isinstance(x, bytes | str) else 8 for x in array.reshape(-1))
    return int(array.nbytes)
