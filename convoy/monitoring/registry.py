"""Monitors: the server's monitoring state, one object owned by the server.

Drift monitors per model version and a feedback store per model (shared by its
versions, so feedback that names no version finds the one that answered). The
exporter and the MonitoringService read it. The repository prepares a model
version's monitoring while it builds the version, activates it when the version
starts serving and detaches it when the version closes: what is registered is
always the monitoring of a version that serves, so a reload that fails after
preparing leaves the serving version's monitor, figures and metrics as they were.
The served version keeps the ModelMonitoring handle and calls its observe() once
per answered request, on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelSpec
from ..errors import ModelNotFound
from ..tensors import Array
from .detectors import Tokenizer
from .feedback import FeedbackLabel, FeedbackOutcome, FeedbackStore
from .monitor import Clock, ModelMonitor
from .params import parse_monitoring_params

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelMonitoring:
    """One served model version's monitoring; both parts None when it has none."""

    model: str
    version: str
    drift: ModelMonitor | None
    feedback: FeedbackStore | None
    failures: int = 0  # observations that raised (logged once), never the caller's problem

    @property
    def active(self) -> bool:
        return self.drift is not None or self.feedback is not None

    def observe(
        self, request_id: str, inputs: Mapping[str, Array], outputs: Mapping[str, Array]
    ) -> None:
        """On the event loop, once per answered request: sample its rows (O(1), a copy
        of a few rows) and keep its prediction for feedback. Never raises: the request
        has its answer already, and monitoring must not turn it into an error."""
        try:
            if self.drift is not None:
                self.drift.sampler.offer(inputs, outputs)
            if self.feedback is not None:
                self.feedback.record(request_id, self.version, outputs)
        except Exception:
            self.failures += 1
            if self.failures == 1:
                log.exception("monitoring of %s:%s failed to observe", self.model, self.version)


class Monitors:
    def __init__(self) -> None:
        self._drift: dict[tuple[str, str], ModelMonitor] = {}
        self._feedback: dict[str, FeedbackStore] = {}
        self._lock = threading.Lock()  # the scrape thread lists while the loop adds
        self._unknown_model_refusals = 0
        # The handles using each model's feedback store: a reload attaches the new
        # version before the old one detaches, so versions alone cannot tell.
        self._feedback_users: dict[str, set[ModelMonitoring]] = {}

    def prepare(
        self,
        spec: ModelSpec,
        version: str,
        model_dir: Path,
        config_path: str,
        labels: Mapping[str, Sequence[str]] | None = None,
        clock: Clock = time.monotonic,
        tokenizer: Tokenizer | None = None,
    ) -> ModelMonitoring:
        """Parse the model's monitoring parameters, load its reference and fit the
        detectors; nothing is registered or started until activate(). ConfigError
        (naming the file and field) fails the model's load. Blocking (file I/O,
        fitting): run it where the model's other load work runs, off the event loop.

        `labels`: class labels per output (ServedModel.labels), for feedback by label;
        `tokenizer`: a text hook for BYTES inputs (tokens.tokenizer_hook)."""
        params = parse_monitoring_params(spec, config_path)
        drift = None
        if params.drift is not None:
            drift = ModelMonitor.for_model(spec, version, model_dir, params.drift, clock, tokenizer)
        store = None
        if params.feedback is not None:
            output_labels = (labels or {}).get(params.feedback.output, ())
            store = FeedbackStore(spec.name, params.feedback, spec.batched, output_labels, clock)
        return ModelMonitoring(spec.name, version, drift, store)

    def activate(self, handle: ModelMonitoring) -> None:
        """The version starts serving: its drift monitor replaces any other of the same
        model and version (a reload's predecessor, which stops when it is detached) and
        its thread starts; the version records into its model's feedback store (the
        one its other versions use, if any), which takes this version's settings:
        feedback_* as this load read them. Call it where the version starts."""
        if handle.feedback is not None:
            with self._lock:
                current = self._feedback.get(handle.model)
                if current is None:
                    self._feedback[handle.model] = handle.feedback
                else:
                    # One store per model, so that feedback naming no version finds the
                    # one that answered, across reloads too: the latest load sets it.
                    current.reconfigure(handle.feedback)
                    handle.feedback = current
                self._feedback_users.setdefault(handle.model, set()).add(handle)
        if handle.drift is not None:
            self.add_monitor(handle.drift)
            handle.drift.start()

    def attach(
        self,
        spec: ModelSpec,
        version: str,
        model_dir: Path,
        config_path: str,
        labels: Mapping[str, Sequence[str]] | None = None,
        clock: Clock = time.monotonic,
        tokenizer: Tokenizer | None = None,
    ) -> ModelMonitoring:
        """prepare() and activate() at once, for a version that serves at once."""
        handle = self.prepare(spec, version, model_dir, config_path, labels, clock, tokenizer)
        self.activate(handle)
        return handle

    def detach(self, handle: ModelMonitoring) -> None:
        """Stop and forget a version's monitoring (prepared or active); its model's
        feedback store goes with the last active version. Blocking: joins the drift
        thread (at most one scoring pass)."""
        if handle.drift is not None:
            with self._lock:
                # Only if still this handle's: a reload may have registered its successor,
                # and a version that never served registered nothing.
                key = (handle.model, handle.version)
                if self._drift.get(key) is handle.drift:
                    del self._drift[key]
            handle.drift.stop()
        if handle.feedback is not None:
            with self._lock:
                users = self._feedback_users.get(handle.model, set())
                users.discard(handle)
                if not users:
                    self._feedback_users.pop(handle.model, None)
                    if self._feedback.get(handle.model) is handle.feedback:
                        del self._feedback[handle.model]

    def add_monitor(self, monitor: ModelMonitor) -> None:
        with self._lock:
            self._drift[(monitor.model, monitor.version)] = monitor

    def remove_monitor(self, model: str, version: str) -> ModelMonitor | None:
        """Forget a version's monitor; the caller stops it."""
        with self._lock:
            return self._drift.pop((model, version), None)

    def monitor(self, model: str, version: str) -> ModelMonitor | None:
        return self._drift.get((model, version))

    def monitors(self, model: str | None = None) -> list[ModelMonitor]:
        with self._lock:
            found = [m for (name, _), m in self._drift.items() if model in (None, name)]
        return sorted(found, key=lambda m: (m.model, _version_key(m.version)))

    def add_feedback(self, store: FeedbackStore) -> FeedbackStore:
        """Register a model's store, or return the one its other versions already use
        (as it is: activate() is what applies a load's settings)."""
        with self._lock:
            return self._feedback.setdefault(store.model, store)

    def remove_feedback(self, model: str) -> None:
        with self._lock:
            self._feedback.pop(model, None)

    def feedback_store(self, model: str) -> FeedbackStore | None:
        return self._feedback.get(model)

    def feedback_stores(self) -> list[FeedbackStore]:
        with self._lock:
            return sorted(self._feedback.values(), key=lambda s: s.model)

    def feedback(
        self, model: str, request_id: str, label: FeedbackLabel, version: str = ""
    ) -> FeedbackOutcome:
        """Route feedback to its model's store; ModelNotFound (counted) if it has none."""
        store = self._feedback.get(model)
        if store is None:
            with self._lock:
                self._unknown_model_refusals += 1
            raise ModelNotFound(
                f"model '{model[:128]}' is not loaded or takes no feedback "
                "(set a feedback_* parameter in its config.pbtxt)"
            )
        return store.feedback(request_id, label, version)

    @property
    def unknown_model_refusals(self) -> int:
        return self._unknown_model_refusals


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)
