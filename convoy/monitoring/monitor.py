"""ModelMonitor: one model version's detectors, its sampler and the thread that runs them.

The event loop calls `sampler.offer()` per answered request. A background thread,
started and stopped by the monitor's owner, wakes every `drift_interval_s`, takes
the full windows and scores them (`run_once()`, which tests call directly instead
of waiting). The latest figures stay here for the exporter and the gRPC service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelSpec, TensorSpec
from ..errors import ConfigError
from ..tensors import Array
from .detectors import Detector, DriftResult, Tokenizer, build_detector, choose_test
from .params import DriftParams
from .reference import ReferenceCollector, ReferenceData, finite_rows, load_reference
from .sampler import SampledTensor, Sampler

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # seconds, monotonic


@dataclass(frozen=True)
class TensorStatus:
    name: str
    is_output: bool
    test: str  # the detector's test; "" while the reference is being collected
    state: str  # collecting_reference | waiting_for_window | scored | not_tested
    reference_size: int  # rows the detector was fitted on (or collected so far)
    windows: int  # windows scored
    alarms: int  # windows whose test found drift
    result: DriftResult | None  # the latest window's
    scored_at_s: float | None  # clock time of that window
    nonfinite_reference_rows: int = 0  # first:N rows left out: NaN or infinite values
    nonfinite_window_rows: int = 0  # window rows left out before testing, for the same
    strings_skipped: int | None = None  # BYTES: sampled strings over the byte budget


@dataclass(frozen=True)
class MonitorStatus:
    model: str
    version: str
    reference: str  # the file, or first:N
    tensors: tuple[TensorStatus, ...]
    requests_sampled: int
    windows_dropped: int
    window_count: int


class _TensorState:
    def __init__(self, tensor: SampledTensor) -> None:
        self.tensor = tensor
        self.detector: Detector | None = None
        self.collector: ReferenceCollector | None = None
        self.windows = 0
        self.alarms = 0
        self.result: DriftResult | None = None
        self.scored_at_s: float | None = None
        self.nonfinite_reference = 0
        self.nonfinite_window = 0


class ModelMonitor:
    """Owns the sampler, the detectors and (between start() and stop()) a thread."""

    def __init__(
        self,
        spec: ModelSpec,
        version: str,
        params: DriftParams,
        reference: ReferenceData | None,
        clock: Clock = time.monotonic,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """`reference` None means first:N: the detectors are fitted once N rows are in."""
        self.model = spec.name
        self.version = version
        self.params = params
        self.source = reference.source if reference is not None else params.source
        self._clock = clock
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # guards the figures the exporter reads
        self._run_lock = threading.Lock()  # one scoring pass at a time
        self._states: dict[str, _TensorState] = {}
        classifiers = spec.softmax_outputs | {t.name for t in spec.outputs if t.label_filename}
        tensors = [(t, False) for t in spec.inputs] + [(t, True) for t in spec.outputs]
        for tensor, is_output in tensors:
            state = self._state_for(tensor, is_output, reference, tensor.name in classifiers)
            if state is not None:
                self._states[tensor.name] = state
        self.sampler = Sampler(
            [s.tensor for s in self._states.values()],
            batched=spec.batched,
            window=params.window,
            sample_rate=params.sample_rate,
            rows_per_request=params.rows_per_request,
        )
        self._classifiers = classifiers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_model(
        cls,
        spec: ModelSpec,
        version: str,
        model_dir: Path,
        params: DriftParams,
        clock: Clock = time.monotonic,
        tokenizer: Tokenizer | None = None,
    ) -> ModelMonitor:
        """Load the reference file named by the parameters (ConfigError naming the file
        and array if it is bad) and fit the detectors; first:N defers both."""
        reference = None
        if params.reference_file:
            reference = load_reference(model_dir / params.reference_file, spec)
        return cls(spec, version, params, reference, clock, tokenizer)

    def _state_for(
        self,
        tensor: TensorSpec,
        is_output: bool,
        reference: ReferenceData | None,
        classifier: bool,
    ) -> _TensorState | None:
        if self.params.tests.get(tensor.name) == "off":
            return None
        if tensor.datatype != "BYTES" and any(d < 0 for d in tensor.dims):
            return None  # no fixed columns to compare (see choose_test)
        state = _TensorState(SampledTensor(tensor, is_output))
        if reference is None:
            state.collector = ReferenceCollector(tensor, self.params.first_n, self.source)
            return state
        rows = reference.arrays.get(tensor.name)
        if rows is None:
            return None  # an output the reference file does not describe
        test = choose_test(tensor, rows, self.params, classifier)
        if test == "off":
            return None
        state.detector = self._fit(test, rows, tensor.name)
        return state

    def _fit(self, test: str, rows: Array, name: str) -> Detector:
        try:
            return build_detector(test, rows, self.params, self._tokenizer)
        except (ValueError, TypeError) as exc:
            # A reference a test cannot use (e.g. numbers given for a text test).
            raise ConfigError(self.source, name, f"cannot fit the {test} test: {exc}") from None

    # -- the background thread ------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"drift-{self.model}:{self.version}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits for a test in progress to finish)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.params.interval_s):
            try:
                self.run_once()
            except Exception:  # a detector bug must not end monitoring for good
                log.exception("drift monitoring of %s:%s failed", self.model, self.version)

    def run_once(self) -> int:
        """Score every full window waiting; returns how many were scored.

        Rows holding NaN or infinity are left out of a window before its test, and
        counted: a test cannot weigh them, and a few would otherwise decide the
        window (a classifier's top-1 class of NaN scores). A window left with fewer
        than two rows is not tested; the count shows why."""
        scored = 0
        with self._run_lock:
            for name, window in self.sampler.take():
                state = self._states[name]
                if state.detector is None:
                    self._collect(state, window)
                    continue
                finite = finite_rows(window)
                kept = window if finite.all() else window[finite]
                if len(kept) < len(window):
                    with self._lock:
                        state.nonfinite_window += len(window) - len(kept)
                if len(kept) < 2:
                    continue
                result = state.detector.score(kept)
                now = self._clock()
                with self._lock:
                    state.result = result
                    state.windows += 1
                    state.alarms += int(result.is_drift)
                    state.scored_at_s = now
                scored += 1
        return scored

    def _collect(self, state: _TensorState, window: Array) -> None:
        assert state.collector is not None
        rows = state.collector.add(window)
        with self._lock:
            state.nonfinite_reference = state.collector.nonfinite
        if rows is None:
            return
        tensor = state.tensor
        classifier = tensor.spec.name in self._classifiers
        test = choose_test(tensor.spec, rows, self.params, classifier)
        if test == "off":
            log.info("drift: %s:%s %s is not tested", self.model, self.version, tensor.spec.name)
            with self._lock:
                state.collector = None
            return
        detector = build_detector(test, rows, self.params, self._tokenizer)
        with self._lock:
            state.detector = detector
            state.collector = None

    # -- figures ------------------------------------------------------------------

    @property
    def window_count(self) -> int:
        with self._lock:
            return sum(s.windows for s in self._states.values())

    def status(self) -> MonitorStatus:
        skipped = self.sampler.strings_skipped
        with self._lock:
            tensors = tuple(
                self._tensor_status(s, skipped.get(name)) for name, s in self._states.items()
            )
        return MonitorStatus(
            model=self.model,
            version=self.version,
            reference=self.source,
            tensors=tensors,
            requests_sampled=self.sampler.sampled,
            windows_dropped=self.sampler.dropped,
            window_count=sum(t.windows for t in tensors),
        )

    @staticmethod
    def _tensor_status(s: _TensorState, strings_skipped: int | None) -> TensorStatus:
        if s.detector is None:
            # No collector either: first:N found nothing this tensor can be tested with.
            state = "collecting_reference" if s.collector is not None else "not_tested"
            size = s.collector.filled if s.collector is not None else 0
            test = ""
        else:
            state = "scored" if s.result is not None else "waiting_for_window"
            size = s.detector.reference_size
            test = s.detector.test
        return TensorStatus(
            name=s.tensor.spec.name,
            is_output=s.tensor.is_output,
            test=test,
            state=state,
            reference_size=size,
            windows=s.windows,
            alarms=s.alarms,
            result=s.result,
            scored_at_s=s.scored_at_s,
            nonfinite_reference_rows=s.nonfinite_reference,
            nonfinite_window_rows=s.nonfinite_window,
            strings_skipped=strings_skipped,
        )
