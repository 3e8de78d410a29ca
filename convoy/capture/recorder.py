"""CaptureRecorder: the inference path's answer observer that samples and buffers a row
per captured request (on the event loop: references or a few copies, no I/O).
LabelRecorder: the Feedback RPC's accepted labels, buffered the same way."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import CaptureSpec, ModelSpec, TensorSpec
from ..errors import ConvoyError
from ..inference.path import Answered
from ..repository.model import ModelVersion
from ..tensors import NUMPY_DTYPES
from .arena import SMALL_BYTES, Arena
from .rows import Row, hashed
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


# How a row keeps an input: not at all (capture_exclude), as salted hashes
# (capture_hash), or the values themselves.
EXCLUDE, HASH, KEEP = 0, 1, 2
_ABSENT = object()  # a key no inputs' dict holds


# Backends whose every run returns arrays of its own (not buffers it reuses): their
# outputs may be kept by reference. A Python model's code may reuse its buffers; a
# TensorRT engine's host buffers are its own, reused batch after batch.
FRESH_OUTPUTS = frozenset({"pytorch", "onnxruntime"})


class _Plan:
    """What a row of one model config keeps, in the row's order (rows.Row), worked out
    once per config rather than per request."""

    __slots__ = (
        "arenas", "by_reference", "input_keys", "inputs", "last_batches", "output_keys",
        "outputs", "padding", "reference_bytes", "reference_rows", "spec",
    )  # fmt: skip

    def __init__(
        self, spec: ModelSpec, capture: CaptureSpec, max_bytes: int, on_cpu: bool = False
    ) -> None:
        self.spec = spec

        def how(name: str) -> int:
            return EXCLUDE if name in capture.exclude else HASH if name in capture.hashed else KEEP

        def arena(tensor: TensorSpec) -> Arena | None:  # None: BYTES, kept as objects
            if tensor.datatype == "BYTES":
                return None
            return Arena(np.dtype(NUMPY_DTYPES[tensor.datatype]), max_bytes=max_bytes)

        # (name, how, its arena: None for BYTES, whose size is summed item by item)
        self.inputs = tuple((t.name, how(t.name), arena(t)) for t in spec.captured_inputs)
        self.outputs = tuple((t.name, arena(t)) for t in spec.outputs if capture.outputs)
        # capture_outputs: false leaves each output's place in the row empty
        self.padding = () if capture.outputs else (None,) * len(spec.outputs)
        self.arenas = tuple(
            a for a in (*(i[2] for i in self.inputs), *(o[1] for o in self.outputs)) if a
        )
        # A successful request whose inputs are its own (Answered.inputs_own), and whose
        # captured tensors are all small, is kept by reference (CaptureRecorder.__call__):
        # its row is laid out on the writer's thread (expand). Up to reference_rows batch
        # rows each tensor stays under SMALL_BYTES (large ones go to the arenas: arena.py).
        kept = [t for t in spec.captured_inputs if how(t.name) == KEEP]
        hashed_or_bytes = any(how(t.name) == HASH for t in spec.captured_inputs) or any(
            t.datatype == "BYTES" for t in (*kept, *spec.outputs)
        )
        tensors = [*kept, *(spec.outputs if capture.outputs else ())]
        row_bytes = [_row_bytes(t) for t in tensors]
        fresh = on_cpu and spec.backend in FRESH_OUTPUTS and not spec.ensemble
        self.by_reference = (
            not hashed_or_bytes and -1 not in row_bytes and (fresh or not capture.outputs)
        )
        # The batch arrays that kept outputs are views of, each counted once against the
        # budget (a view holds all of its batch): the last one seen, per output.
        self.last_batches: list[object] = [None] * len(self.outputs)
        self.reference_rows = min(
            ((SMALL_BYTES - 1) // max(b, 1) for b in row_bytes), default=0
        ) if self.by_reference else 0  # fmt: skip
        if not spec.batched:
            self.reference_rows = min(self.reference_rows, 1)
        self.reference_bytes = sum(row_bytes) if self.by_reference else 0
        # expand's lookups: an excluded input by a key no dict holds, so it reads None
        self.input_keys: tuple[Any, ...] = tuple(
            _ABSENT if h == EXCLUDE else n for n, h, _ in self.inputs
        )
        self.output_keys = tuple(name for name, _ in self.outputs)

    def batches_held(self, outputs: tuple[Any, ...]) -> int:
        """The bytes of the batch arrays these outputs are views of, where not counted
        already with an earlier request of the same batch."""
        held = 0
        for i, value in enumerate(outputs):
            batch = value.base if value is not None else None
            if batch is not None and batch is not self.last_batches[i]:
                self.last_batches[i] = batch
                held += getattr(batch, "nbytes", 0)
        return held

    def expand(self, kept: tuple[Any, ...]) -> Row:
        """The row of a request kept by reference, on the writer's thread: as _put lays it
        out on the loop for the others."""
        request_id, now_ns, arm, transport, arrival, dispatch, done, cache_hit, client = kept[:9]
        queue_us, compute_us, total_us = _timings(arrival, dispatch, done)
        return (
            request_id, now_ns // 1000, arm, transport, "OK", None, queue_us, compute_us,
            total_us, cache_hit, client, *kept[9:], *self.padding,
        )  # fmt: skip


def _row_bytes(tensor: TensorSpec) -> int:
    """A batch row's bytes of a numeric tensor of fixed dims; -1 where they vary."""
    if -1 in tensor.dims or tensor.datatype == "BYTES":
        return -1
    return (
        int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[tensor.datatype]).itemsize
    )


class CaptureRecorder:
    def __init__(
        self,
        writer: CaptureWriter,
        status_of: Callable[[ConvoyError], str],
        draw: Callable[[], float] | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._writer = writer
        self._status_of = status_of  # the gRPC code name of an error (api/status.py)
        self._draw = draw or np.random.default_rng().random
        self._now_ns = wall_clock_ns
        self._plans: dict[int, _Plan] = {}  # by id() of the config, checked by identity

    def __call__(self, answered: Answered) -> None:
        served = answered.served
        capture = served.spec.capture
        if capture is None:
            return
        if capture.sample_rate < 1.0 and not sampled(capture, answered, self._draw):
            return
        plan = self._plan(served, capture)
        request, result = answered.request, answered.result
        # Kept by reference: a tuple of what already exists, no copy on the loop (the
        # copies and the row's layout cost tiny 12-20 µs of the loop's CPU per request in
        # the server, against 3 µs in-process: the loop's caches are cold there).
        if (
            answered.inputs_own
            and result is not None
            and request is not None
            and request.rows <= plan.reference_rows
        ):
            given = request.inputs
            if result.added_inputs:  # looked-up features: what the model saw
                given = {**given, **result.added_inputs}
            outputs = tuple(map(result.outputs.get, plan.output_keys))
            kept = (
                answered.request_id, self._now_ns(), answered.arm, answered.transport,
                request.arrival_ns, request.dispatch_ns, answered.done_ns, answered.cache_hit,
                answered.client, *map(given.get, plan.input_keys), *outputs,
            )  # fmt: skip
            nbytes = ROW_OVERHEAD_BYTES + request.rows * plan.reference_bytes
            if outputs:
                nbytes += plan.batches_held(outputs)
            self._writer.put_kept(served.spec, served.version_label, plan.expand, kept, nbytes)
            return
        self._put(answered, served, plan)

    def _plan(self, served: ModelVersion, capture: CaptureSpec) -> _Plan:
        spec = served.spec
        plan = self._plans.get(id(spec))
        if plan is None or plan.spec is not spec:
            if len(self._plans) > 256:  # configs of versions long unloaded
                self._plans.clear()
            budget = self._writer.config.max_bytes
            # A GPU instance's outputs lie in pinned host blocks, kept alive as long as a
            # view of them is: they are copied. None: not a served model (an ensemble).
            devices = getattr(served, "devices", None)
            on_cpu = devices is not None and all(d == "cpu" for d in devices)
            plan = self._plans[id(spec)] = _Plan(spec, capture, budget, on_cpu)
        return plan

    def _put(self, answered: Answered, served: ModelVersion, plan: _Plan) -> bool:
        """Copy what the row keeps and buffer it; False: dropped (the writer counts it).
        On the loop, per request: every µs here is one the callers wait for."""
        request, result, error = answered.request, answered.result, answered.error
        queue_us = compute_us = total_us = None
        if request is not None:
            queue_us, compute_us, total_us = _timings(
                request.arrival_ns, request.dispatch_ns, answered.done_ns
            )
        row: list[Any] = [
            answered.request_id,  # "" gets an id on the writer's thread (rows.table)
            self._now_ns() // 1000,
            answered.arm,
            answered.transport,
            "OK" if error is None else self._status_of(error),
            None if error is None else error.message,
            queue_us,
            compute_us,
            total_us,
            answered.cache_hit,
            answered.client,
        ]
        keep = row.append
        nbytes = ROW_OVERHEAD_BYTES
        given = request.inputs if request is not None else {}
        if result is not None and result.added_inputs:  # looked-up features: what the model saw
            given = {**given, **result.added_inputs}
        for name, how, arena in plan.inputs:
            value = given.get(name)
            if value is None or how == EXCLUDE:
                keep(None)
                continue
            if how == HASH:
                kept = hashed(value, self._writer.salt)
                nbytes += _objects_size(kept)
            elif arena is None:  # BYTES
                kept = value.copy()
                nbytes += _objects_size(kept)
            elif value.nbytes < SMALL_BYTES and _in_bytes(value):
                kept = value  # a gRPC-decoded input's own `bytes`: they never change
                nbytes += value.nbytes
            else:  # copied into its arena (arena.py says why even large `bytes`' are)
                kept = arena.copy(value)
                nbytes += kept.nbytes
            keep(kept)
        answers = result.outputs if result is not None else {}
        for name, arena in plan.outputs:
            value = answers.get(name)
            if value is None:
                keep(None)
                continue
            # Copied: a backend's own code (a Python model) may reuse its buffers.
            if arena is None:
                kept = value.copy()
                nbytes += _objects_size(kept)
            else:
                kept = arena.copy(value)
                nbytes += kept.nbytes
            keep(kept)
        if plan.padding:
            row.extend(plan.padding)
        split = False
        for arena in plan.arenas:
            if arena.rolled:
                split, arena.rolled = True, False
        return self._writer.put(served.spec, served.version_label, tuple(row), nbytes, split)


def _timings(arrival: int, dispatch: int, done: int) -> tuple[int | None, int | None, int | None]:
    """(queue_us, compute_us, total_us) from a request's clock readings in ns (0: that
    point was not reached; None where a span cannot be told)."""
    if not arrival:
        return None, None, None
    if not dispatch:
        return None, None, (done - arrival) // 1000
    return (dispatch - arrival) // 1000, (done - dispatch) // 1000, (done - arrival) // 1000


def _in_bytes(value: np.ndarray[Any, Any]) -> bool:
    """Whether the value's memory is a `bytes` object's (np.frombuffer over the gRPC
    decoder's bytes, reshaped or not), which no one can change: such a value is kept as
    it is, no copy (a copy of tiny's 64 bytes was a quarter of the recorder's time on
    the loop, py-spy in the server: cold memory, touched once more)."""
    base: object = value.base
    while type(base) is np.ndarray:
        base = base.base
    return type(base) is bytes


def _objects_size(array: np.ndarray[Any, Any]) -> int:
    """What a BYTES tensor (or hashed input) holds: its items' lengths."""
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
