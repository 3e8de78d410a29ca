"""FeatureBackend: any runtime behind a per-batch Feast lookup.

On the instance's thread, once per batch: every request's entity keys go to the online
store in one call, each request's feature input is filled with its rows (features in
declared order), and the model runs once on the requests whose keys were found. A
request with a key the store does not know (feast_missing: error) is answered
INVALID_ARGUMENT alone; a store that cannot be reached fails the batch UNAVAILABLE. Each
answer carries the features it was served and their timestamps, for capture. A key out
of its Feast type's range (an INT64 sent for an INT32 entity) fails its request alone,
before the lookup, which Feast would fail as a whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..backends.base import AddedInputs, Array, Backend, RequestInputs, RunsRequests
from ..config import FEATURE_TIMESTAMP_SUFFIX, FeatureSpec
from ..errors import ConvoyError, InternalError, InvalidInput
from ..tensors import NUMPY_DTYPES
from .lookup import LookedUp, check_keys, close_store, entity_values, lookup

# (lookup seconds, missing rows per feature, ages in seconds per feature)
Observe = Callable[[float, dict[str, int], dict[str, list[float]]], None]
Answer = dict[str, Array] | AddedInputs | ConvoyError


class FeatureBackend:
    def __init__(
        self,
        inner: Backend,
        store: Any,
        spec: FeatureSpec,
        batched: bool,
        observe: Observe,
        wall_clock: Callable[[], float] = time.time,
        feast_key_types: Mapping[str, str] | None = None,
    ) -> None:
        self._inner = inner
        self.device = inner.device
        self._store = store
        self._spec = spec
        self._batched = batched
        self._observe = observe
        self._now = wall_clock
        self._dtype = NUMPY_DTYPES[spec.output.datatype]
        self._key_types = {t.name: t.datatype for t in spec.caller_inputs}
        self._feast_key_types = dict(feast_key_types or {})  # join key -> Feast value type
        self._per_request = inner if isinstance(inner, RunsRequests) else None

    def run_requests(self, requests: Sequence[RequestInputs]) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(requests)
        keys: dict[str, list[Any]] = {key: [] for key, _ in self._spec.entities}
        spans: list[tuple[int, int]] = []
        start = 0
        for index, request in enumerate(requests):
            try:
                found = self._keys(request)
            except ConvoyError as error:
                answers[index] = error
                spans.append((start, start))
                continue
            rows = len(next(iter(found.values())))
            for key, values in found.items():
                keys[key].extend(values)
            spans.append((start, start + rows))
            start += rows
        if start == 0:  # every request refused: nothing to look up
            return [a if a is not None else InternalError("unanswered") for a in answers]
        began = time.perf_counter()
        looked = lookup(self._store, self._spec, keys)
        self._record(time.perf_counter() - began, looked)
        ready: list[tuple[int, RequestInputs, dict[str, Array]]] = []
        for index, (request, (first, last)) in enumerate(zip(requests, spans, strict=True)):
            if answers[index] is not None:
                continue
            try:
                filled, added = self._fill(request, looked, first, last, keys)
            except ConvoyError as error:
                answers[index] = error
                continue
            ready.append((index, filled, added))
        for (index, _, added), outputs in zip(
            ready, self._run([r for _, r, _ in ready]), strict=True
        ):
            answers[index] = (
                outputs if isinstance(outputs, ConvoyError) else AddedInputs(outputs, added)
            )
        return [a if a is not None else InternalError("unanswered") for a in answers]

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """One request (a warm-up sample): its error raised."""
        (answer,) = self.run_requests([RequestInputs("", inputs, tuple(output_names))])
        if isinstance(answer, ConvoyError):
            raise answer
        return answer.outputs if isinstance(answer, AddedInputs) else answer

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            close_store(self._store)

    # -- one batch -------------------------------------------------------------

    def _keys(self, request: RequestInputs) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        for key, name in self._spec.entities:
            array = request.inputs.get(name)
            if array is None:
                raise InvalidInput(f"entity input '{name}' (feast_entities '{key}') is missing")
            found[key] = list(entity_values(array, self._key_types[name]))
        counts = {len(v) for v in found.values()}
        if len(counts) != 1:
            raise InvalidInput("entity inputs carry different numbers of rows")
        if counts == {0}:
            raise InvalidInput(f"entity inputs {[n for _, n in self._spec.entities]} hold no keys")
        check_keys(found, self._feast_key_types)
        return found

    def _record(self, seconds: float, looked: LookedUp) -> None:
        now_us = self._now() * 1e6
        missing: dict[str, int] = {}
        ages: dict[str, list[float]] = {}
        for j, name in enumerate(self._spec.names):
            present = looked.present[:, j]
            missing[name] = int(present.size - np.count_nonzero(present))
            ages[name] = ((now_us - looked.timestamps_us[present, j]) / 1e6).tolist()
        self._observe(seconds, missing, ages)

    def _fill(
        self,
        request: RequestInputs,
        looked: LookedUp,
        first: int,
        last: int,
        keys: dict[str, list[Any]],
    ) -> tuple[RequestInputs, dict[str, Array]]:
        spec = self._spec
        present = looked.present[first:last]
        values = looked.values[first:last]
        if not present.all():
            if spec.missing == "error":
                row, column = (int(i) for i in np.argwhere(~present)[0])
                entity = ", ".join(f"{k}={keys[k][first + row]!r}" for k, _ in spec.entities)
                if looked.stale[first + row, column]:
                    raise InvalidInput(
                        f"entity {entity}: the feature store's '{spec.features[column]}' for it "
                        "is stale (outside the view's ttl) (feast_missing: error)"
                    )
                raise InvalidInput(
                    f"unknown entity {entity}: the feature store has no '{spec.features[column]}' "
                    "for it (feast_missing: error)"
                )
            values = np.where(present, values, spec.default)
        filled = np.ascontiguousarray(values, dtype=self._dtype)
        stamps = looked.timestamps_us[first:last]
        if not self._batched:
            filled = filled.reshape(-1)
        entity_inputs = {name for _, name in spec.entities}
        inputs = {n: v for n, v in request.inputs.items() if n not in entity_inputs}
        inputs[spec.output.name] = filled
        added: dict[str, Array] = {}
        shape = (-1, 1) if self._batched else (1,)
        for j, name in enumerate(spec.names):
            added[name] = np.ascontiguousarray(filled.reshape(-1, len(spec.names))[:, j]).reshape(
                shape
            )
            added[name + FEATURE_TIMESTAMP_SUFFIX] = np.ascontiguousarray(stamps[:, j]).reshape(
                shape
            )
        return RequestInputs(request.id, inputs, request.output_names), added

    def _run(self, requests: list[RequestInputs]) -> list[dict[str, Array] | ConvoyError]:
        """The model on the filled requests: one run for a batching model."""
        if not requests:
            return []
        if self._per_request is not None:
            answers = self._per_request.run_requests(requests)
            return [a.outputs if isinstance(a, AddedInputs) else a for a in answers]
        if not self._batched or len(requests) == 1:
            return [self._inner.run(r.inputs, r.output_names) for r in requests]
        names = tuple(dict.fromkeys(n for r in requests for n in r.output_names))
        gathered = {
            name: np.concatenate([r.inputs[name] for r in requests], axis=0)
            for name in requests[0].inputs
        }
        outputs = self._inner.run(gathered, names)
        counts = [next(iter(r.inputs.values())).shape[0] for r in requests]
        total = sum(counts)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise InternalError(
                    f"output '{name}' has shape {list(value.shape)}; "
                    f"expected a batch dimension of {total}"
                )
        split: list[dict[str, Array] | ConvoyError] = []
        start = 0
        for request, rows in zip(requests, counts, strict=True):
            split.append({n: outputs[n][start : start + rows] for n in request.output_names})
            start += rows
        return split
