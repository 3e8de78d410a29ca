"""EnsembleModel: Triton's ensemble_scheduling, a DAG of other models run in-process.

Each step is an ordinary request to that model's own queue, so a composing model
batches ensemble and direct callers together and keeps its own statistics; tensors
pass between steps as the numpy arrays they are (no serialisation). Independent
steps run concurrently. A failing step fails only the ensemble requests it carried.

The steps are checked against the models they name when the ensemble loads
(`check`): unknown model or version, unmapped or unknown tensor, a tensor produced
twice, a cycle, a datatype or shape mismatch, each a ConfigError naming the step
and field. Composing models are looked up per request, so a reload of one is used
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from convoy.kernels.classify import format_classes

from ..backends.base import ShapeRange
from ..backends.ranking import rank_on_host
from ..batching.request import InferRequest, InferResult
from ..config import EnsembleStep, ModelSpec, TensorSpec
from ..errors import ConfigError, ConvoyError, InvalidInput
from ..metrics import ModelMetrics
from ..monitoring.registry import ModelMonitoring
from ..pb import model_config_pb2 as mc
from ..statistics import ModelStatistics
from ..tensors import Array, Ranked, Ranking
from .model import ModelVersion

Lookup = Callable[[str, str], ModelVersion]  # (model, version or "") -> the serving version
# (model, version or "", the step's request built from the version that will run it, the
# ensemble's request) -> its result: ModelRepository._run_step, which hands the step to the
# inference path (routing by the model's rollout, cache, shadow, monitoring).
StepRunner = Callable[
    [str, str, Callable[[ModelVersion], InferRequest], InferRequest], Awaitable[InferResult]
]


@dataclass(frozen=True)
class _Step:
    index: int
    spec: EnsembleStep
    needs: frozenset[str]  # ensemble tensors it reads

    @property
    def version(self) -> str:
        return "" if self.spec.version == -1 else str(self.spec.version)


class EnsembleModel:
    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        config: mc.ModelConfig,
        metrics: ModelMetrics,
        lookup: Lookup,
        config_path: str,
        clock: Callable[[], int],
        run_step: StepRunner,
    ) -> None:
        self.spec = spec
        self.version = version
        self.version_label = str(version)
        self.config = config
        self.metrics = metrics
        self.stats = ModelStatistics(name=spec.name, version=str(version))
        self.labels: dict[str, list[str]] = {}
        self.ready = True
        self.monitoring: ModelMonitoring | None = None
        self.monitoring_handle: ModelMonitoring | None = None
        self.input_bounds: Mapping[str, ShapeRange] = {}
        self.inflight = 0
        self._no_requests = asyncio.Event()  # set while inflight is 0
        self._no_requests.set()
        self._lookup = lookup
        self._run_on = run_step
        self._path = config_path
        self._clock = clock
        self._steps: tuple[_Step, ...] = ()

    # -- load ----------------------------------------------------------------------

    def check(self) -> None:
        """Validate the steps against the models they name; order them (ConfigError)."""
        produced: dict[str, TensorSpec] = {t.name: t for t in self.spec.inputs}
        producer: dict[str, str] = {t.name: "the ensemble's input" for t in self.spec.inputs}
        steps: list[_Step] = []
        for index, step in enumerate(self.spec.ensemble):
            field = f"ensemble_scheduling.step[{index}]"
            model = self._composing(step, field)
            if model.spec.batched != self.spec.batched or (
                self.spec.batched and model.spec.max_batch_size < self.spec.max_batch_size
            ):
                raise ConfigError(
                    self._path,
                    f"{field}.model_name",
                    f"model '{step.model}' has max_batch_size {model.spec.max_batch_size}; "
                    f"the ensemble's {self.spec.max_batch_size} needs a batching model with "
                    "at least as large a batch",
                )
            for name, _ in step.input_map:
                if model.spec.input(name) is None:
                    raise ConfigError(
                        self._path,
                        f"{field}.input_map",
                        f"model '{step.model}' has no input '{name}'",
                    )
            mapped = {name for name, _ in step.input_map}
            missing = [t.name for t in model.spec.inputs if not t.optional and t.name not in mapped]
            if missing:
                raise ConfigError(
                    self._path,
                    f"{field}.input_map",
                    f"input(s) {missing} of model '{step.model}' are not mapped",
                )
            for name, tensor in step.output_map:
                out = model.spec.output(name)
                if out is None:
                    raise ConfigError(
                        self._path,
                        f"{field}.output_map",
                        f"model '{step.model}' has no output '{name}'",
                    )
                if tensor in producer:
                    raise ConfigError(
                        self._path,
                        f"{field}.output_map",
                        f"tensor '{tensor}' is already produced by {producer[tensor]}",
                    )
                produced[tensor] = out
                producer[tensor] = f"step {index} ('{step.model}')"
            steps.append(_Step(index, step, frozenset(t for _, t in step.input_map)))
        for ordered in steps:
            field = f"ensemble_scheduling.step[{ordered.index}].input_map"
            model = self._composing(ordered.spec, field)
            for name, tensor in ordered.spec.input_map:
                source = produced.get(tensor)
                if source is None:
                    raise ConfigError(
                        self._path, field, f"tensor '{tensor}' is produced by no step or input"
                    )
                _check_compatible(source, model.spec.input(name), self._path, field, tensor)  # type: ignore[arg-type]
        for output in self.spec.outputs:
            source = produced.get(output.name)
            if source is None or output.name in {t.name for t in self.spec.inputs}:
                raise ConfigError(
                    self._path, "output", f"ensemble output '{output.name}' is produced by no step"
                )
            _check_compatible(source, output, self._path, "output", output.name)
        self._steps = _ordered(steps, {t.name for t in self.spec.inputs}, self._path)

    def _composing(self, step: EnsembleStep, field: str) -> ModelVersion:
        version = "" if step.version == -1 else str(step.version)
        try:
            return self._lookup(step.model, version)
        except ConvoyError as exc:
            raise ConfigError(
                self._path, f"{field}.model_name", f"model '{step.model}': {exc.message}"
            ) from None

    def start(self) -> None:
        self.metrics.watch(lambda: 0, lambda: self.inflight)
        self.metrics.read(self.stats)  # Prometheus's request series, read when scraped

    async def close(self, drain: bool, timeout_s: float | None = None) -> None:
        self.ready = False
        self.metrics.serving(False)
        if drain:
            # Requests still running their steps are counted when they finish: the
            # statistics are folded into the metrics' totals only after that.
            await self._idle(timeout_s)
        self.metrics.release()

    async def _idle(self, timeout_s: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_requests.wait(), timeout_s)

    def discard(self) -> None:
        """Nothing to release: an ensemble owns no instances."""

    # -- serving -------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResult:
        self.inflight += 1
        self._no_requests.clear()
        try:
            result = await self._run(request)
        except ConvoyError as exc:
            self._done(request, exc)
            raise
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._no_requests.set()
        self._done(request, None)
        return result

    async def _run(self, request: InferRequest) -> InferResult:
        tensors: dict[str, Array] = dict(request.inputs)
        pending = list(self._steps)
        while pending:
            ready = [s for s in pending if s.needs <= tensors.keys()]
            if not ready:
                missing = sorted(set().union(*(s.needs for s in pending)) - tensors.keys())
                raise InvalidInput(
                    f"ensemble '{self.spec.name}': input(s) {missing} are needed by its steps"
                )
            outputs = await asyncio.gather(*(self._run_step(s, tensors, request) for s in ready))
            for produced in outputs:
                tensors.update(produced)
            pending = [s for s in pending if s not in ready]
        full = {n: tensors[n] for n in request.outputs if n not in request.classification}
        ranked: dict[str, Ranked] = {}
        if request.classification:
            ranked = await asyncio.to_thread(self._rank, tensors, request.classification)
        return InferResult(full, ranked)

    async def _run_step(
        self, step: _Step, tensors: Mapping[str, Array], request: InferRequest
    ) -> dict[str, Array]:
        inputs = {name: tensors[tensor] for name, tensor in step.spec.input_map}

        def build(model: ModelVersion) -> InferRequest:
            shapes: dict[str, tuple[int, ...]] = {}
            for name, array in inputs.items():
                expected = model.spec.input(name)
                item = tuple(array.shape[1:] if model.spec.batched else array.shape)
                if expected is None or not expected.matches(item):
                    raise InvalidInput(
                        f"ensemble '{self.spec.name}' step {step.index}: input '{name}' of "
                        f"model '{step.spec.model}' cannot take shape {list(array.shape)}"
                    )
                shapes[name] = item
            return InferRequest(
                id=request.id,
                inputs=inputs,
                outputs=tuple(name for name, _ in step.spec.output_map),
                rows=request.rows,
                shape_key=model.spec.shape_key(shapes),
                future=asyncio.get_running_loop().create_future(),
                arrival_ns=self._clock(),
                deadline_ns=request.deadline_ns,
                priority=request.priority,
                background=request.background,
            )

        result = await self._run_on(step.spec.model, step.version, build, request)
        return {tensor: result.outputs[name] for name, tensor in step.spec.output_map}

    def _rank(self, tensors: Mapping[str, Array], wanted: Mapping[str, int]) -> dict[str, Ranked]:
        rankings = {name: Ranking(k, False, self.spec.batched) for name, k in wanted.items()}
        ranked = rank_on_host(tensors, rankings)
        return {
            name: Ranked(r.values, r.indices, format_classes(r.values, r.indices))
            for name, r in ranked.items()
        }

    def _done(self, request: InferRequest, error: ConvoyError | None) -> None:
        total = self._clock() - request.arrival_ns if request.arrival_ns else 0
        reason = None if error is None else type(error).__name__
        self.stats.record_request(error is None, total, None, reason)
        if error is None:
            self.stats.record_batch(request.rows, 1, 0, 0, 0)

    def record_cached(self, total_ns: int) -> None:
        """A success, as Triton counts cache hits; inference_count is left alone."""
        self.stats.record_request(True, total_ns, None)

    def record_rejection(self, error: ConvoyError) -> None:
        self.stats.record_request(False, 0, None, type(error).__name__)


def _check_compatible(
    source: TensorSpec, target: TensorSpec, path: str, field: str, tensor: str
) -> None:
    if source.datatype != target.datatype:
        raise ConfigError(
            path,
            field,
            f"tensor '{tensor}' is {source.datatype} where it is produced but "
            f"{target.datatype} where it is used",
        )
    if len(source.dims) != len(target.dims) or any(
        a != b and a != -1 and b != -1 for a, b in zip(source.dims, target.dims, strict=False)
    ):
        raise ConfigError(
            path,
            field,
            f"tensor '{tensor}' has dims {list(source.dims)} where it is produced but "
            f"{list(target.dims)} where it is used",
        )


def _ordered(steps: list[_Step], inputs: set[str], path: str) -> tuple[_Step, ...]:
    """Steps in an order where each runs after what it reads (ConfigError on a cycle)."""
    available = set(inputs)
    order: list[_Step] = []
    left = list(steps)
    while left:
        runnable = [s for s in left if s.needs <= available]
        if not runnable:
            names = [f"step[{s.index}] ('{s.spec.model}')" for s in left]
            raise ConfigError(path, "ensemble_scheduling", f"the steps {names} form a cycle")
        for step in runnable:
            order.append(step)
            available |= {tensor for _, tensor in step.spec.output_map}
        left = [s for s in left if s not in runnable]
    return tuple(order)
