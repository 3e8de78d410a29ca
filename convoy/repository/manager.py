"""ModelRepository: the models under one directory, loaded, versioned and unloaded.

Layout (Triton's): <root>/<model>/config.pbtxt and <root>/<model>/<version>/<model file>.
One asyncio.Lock per model serialises its loads and unloads; building
instances (file I/O, runtime start-up) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import load_backend, probe_signature
from ..backends.base import Backend, BackendSignature, default_threads
from ..batching.queue import BatchTracer, Clock
from ..batching.request import InferRequest, InferResult
from ..config import (
    CONFIG_FILENAME,
    DEFAULT_LIMITS,
    ENSEMBLE,
    ModelSpec,
    ServingLimits,
    infer_backend,
    read_model_config,
    validate_model_config,
    version_policy_of,
)
from ..errors import ConfigError, ConvoyError, InvalidInput, ModelNotFound, ModelNotReady
from ..features.serving import FeatureSource, open_features
from ..metrics import Metrics
from ..monitoring.registry import ModelMonitoring, Monitors
from ..monitoring.tokens import tokenizer_hook
from ..pb import model_config_pb2 as mc
from ..scheduling.devices import place_group, resolved_kind
from ..scheduling.health import DeviceHealth
from ..scheduling.pool import InstancePool, ModelInstance
from ..tensors import WIRE_TO_CONFIG
from .ensemble import EnsembleModel, StepRunner
from .memory import HOST, MemoryProbe, PeakSampler, ProcessMemory, files_size, growth
from .model import ModelVersion, OutcomeSink, ServedModel
from .warmup import warm_up

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A rollout's choices, kept across reloads: the version unversioned requests get
    # (None: Triton's rule, the latest), and versions loaded beyond the version_policy.
    pinned: int | None = None
    extra: set[int] = field(default_factory=set)
    # version -> device -> bytes its last load measured; kept after an unload, as the
    # estimate of the next load of the model (on-demand budgets).
    memory: dict[int, dict[str, int]] = field(default_factory=dict)
    # device -> the most the last load of the model took while it ran (transients too).
    peak: dict[str, int] = field(default_factory=dict)

    def latest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None

    def default(self) -> ModelVersion | None:
        if self.pinned is not None:
            served = self.versions.get(self.pinned)
            if served is not None:
                return served
        return self.latest()


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class LoadFailure:
    """Why a model's last load failed: the version being built (None: the model as a
    whole: config.pbtxt, version policy, an ensemble's steps) and the error raised."""

    version: int | None
    error: ConvoyError


class _VersionFailed(Exception):
    """A version's build failed: carries which version from the worker thread to the
    loop, where the original error is raised again."""

    def __init__(self, version: int, cause: Exception) -> None:
        super().__init__(f"version {version}: {cause}")
        self.version = version
        self.cause = cause


class ModelRepository:
    def __init__(
        self,
        root: Path,
        metrics: Metrics,
        clock: Clock = time.monotonic_ns,
        limits: ServingLimits = DEFAULT_LIMITS,
        drain_timeout_s: float | None = None,
        health: DeviceHealth | None = None,
        memory: MemoryProbe | None = None,
    ) -> None:
        self.root = root.resolve()
        self.memory = memory or ProcessMemory()  # read around every load
        # RepositoryIndex's reason for a model on disk that is not loaded.
        self.absent_reason = "unloaded"
        # Peak host memory per byte of model files, the most any load measured: scales
        # the files' size into the first estimate of a model never loaded.
        self._per_file_byte = 1.0
        self.limits = limits
        self.health = health or DeviceHealth()
        self._metrics = metrics
        self.monitors = Monitors()  # drift and feedback of the loaded versions
        self._clock = clock
        self._drain_timeout = drain_timeout_s  # the grace period bounds every drain
        self._models: dict[str, ModelEntry] = {}
        self._failures: dict[str, LoadFailure] = {}  # model -> its last load, if it failed
        self._tasks: set[asyncio.Task[None]] = set()
        self.outcomes: OutcomeSink | None = None  # every request's outcome (rollout analysis)
        # Versions a reload must keep whatever the version_policy (a rollout's arms).
        self.keep_loaded: Callable[[str], Iterable[str]] | None = None
        # Told of every load, reload and unload of a model (the response cache empties).
        self.on_change: Callable[[str], object] | None = None
        # Told when a load or unload has finished, old versions closed (the heap settles).
        self.on_finished: Callable[[], object] | None = None
        # How an ensemble's steps run: the inference path's own (routing by the step
        # model's rollout, cache, shadow, monitoring); None runs them on the model directly.
        self.steps: StepRunner | None = None
        # Tracing on: (model, version) -> the span writer of that version's batches.
        self.batch_tracing: Callable[[str, str], BatchTracer] | None = None

    async def _run_step(
        self,
        name: str,
        version: str,
        build: Callable[[ModelVersion], InferRequest],
        parent: InferRequest,
    ) -> InferResult:
        """An ensemble step, through `steps` where the server set one (read per call:
        ensembles loaded before the server wired it follow it too)."""
        if self.steps is not None:
            return await self.steps(name, version, build, parent)
        model = self.get(name, version)
        return await model.infer(build(model))

    # -- queries (event loop, no awaits) -------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        entry = self._models.get(name)
        if entry is None or (entry.state != READY and not entry.versions):
            if entry is not None and entry.state in (LOADING, UNAVAILABLE) and entry.reason:
                raise ModelNotReady(f"model '{name}' is not ready: {entry.reason}")
            if entry is not None and entry.state == LOADING:
                raise ModelNotReady(f"model '{name}' is loading")
            raise ModelNotFound(f"model '{name}' is not found")
        if not version:
            served = entry.default()
            if served is None:
                raise ModelNotReady(f"model '{name}' has no ready version")
            return served
        try:
            number = int(version)
        except ValueError:
            raise InvalidInput(f"model_version '{version}' is not an integer") from None
        served = entry.versions.get(number)
        if served is None:
            raise ModelNotFound(f"model '{name}' version {version} is not found")
        return served

    def versions_of(self, name: str) -> list[ModelVersion]:
        """The served versions of one model, ascending."""
        entry = self._models.get(name)
        return [] if entry is None else [m for _, m in sorted(entry.versions.items())]

    def ready_models(self) -> list[ModelVersion]:
        return [m for e in self._models.values() for _, m in sorted(e.versions.items())]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        names = set(self._models) | set(self.on_disk())
        rows: list[IndexEntry] = []
        for name in sorted(names):
            entry = self._models.get(name)
            if entry is None:
                if not ready_only:
                    rows.append(IndexEntry(name, "", UNAVAILABLE, self.absent_reason))
                continue
            if entry.versions:
                rows.extend(IndexEntry(name, str(v), READY, "") for v in sorted(entry.versions))
            elif not ready_only:
                rows.append(IndexEntry(name, "", entry.state, entry.reason))
        return rows

    def load_failure(self, name: str) -> LoadFailure | None:
        """Why the model's last load failed; None once a load succeeded (or it was
        unloaded)."""
        return self._failures.get(name)

    def on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _looks_like_model(p)
        )

    # -- load / unload ---------------------------------------------------------

    async def load_all(self) -> None:
        # Ensembles last: their steps are checked against the models they name.
        for name in sorted(self.on_disk(), key=self._is_ensemble):
            try:
                await self.load(name)
            except ConvoyError as exc:
                log.error("model '%s' failed to load: %s", name, exc.message)

    async def load(self, name: str, reason: str = "explicit") -> None:
        """Load (or reload) a model; the old versions serve until the new ones are ready.
        `reason` (first_request, explicit, poll) labels convoy_model_loads_total.

        The load runs as a task the repository owns: a caller that leaves (deadline,
        disconnect) stops waiting, not loading; nothing is left half-built.
        """
        await self._owned(self._load(name, reason))

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        """Stop routing to the model, finish its queued requests, free its instances;
        `reason` is what RepositoryIndex says of it afterwards."""
        await self._owned(self._unload(name, reason))

    async def _owned(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        await asyncio.shield(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that left was told nothing, the log was
        if self.on_finished is not None:
            self.on_finished()

    @property
    def busy(self) -> bool:
        """A load or unload is in progress."""
        return bool(self._tasks)

    async def _load(self, name: str, reason: str) -> None:
        model_dir = self._model_dir(name)
        entry = self._models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            if not entry.versions:
                entry.state, entry.reason = LOADING, ""
            version: int | None = None
            try:
                keep = set(entry.extra) | ({entry.pinned} if entry.pinned is not None else set())
                if self.keep_loaded is not None:
                    keep |= {_version_number(v) for v in self.keep_loaded(name)}
                before = await asyncio.to_thread(self.memory.used)
                started = time.perf_counter()
                try:
                    new_versions, peak = await asyncio.to_thread(
                        self._build_sampled, model_dir, keep
                    )
                except _VersionFailed as failed:
                    version = failed.version
                    raise failed.cause from None
                _check_ensembles(new_versions)
                grown = growth(before, await asyncio.to_thread(self.memory.used))
                entry.peak = growth(before, peak)
                if _ensembles(new_versions):  # it holds no weights: what grew is noise
                    grown = dict.fromkeys(grown, 0)
                    entry.peak = dict.fromkeys(entry.peak, 0)
                files = await asyncio.to_thread(_files_by_version, model_dir, new_versions)
            except ConvoyError as exc:
                if not entry.versions:
                    entry.state, entry.reason = UNAVAILABLE, exc.message
                self._load_failed(name, version, exc)
                raise
            except Exception as exc:  # a runtime refusing the model file
                message = f"{model_dir}: failed to load: {exc}"
                if not entry.versions:
                    entry.state, entry.reason = UNAVAILABLE, message
                error = ConfigError(str(model_dir), "model file", str(exc))
                self._load_failed(name, version, error)
                raise error from exc
            self._failures.pop(name, None)
            self._metrics.model_load_seconds.observe(time.perf_counter() - started)
            self._metrics.model_loads.labels(name, reason).inc()
            old = entry.versions
            for served in new_versions.values():
                served.start()
            entry.versions = new_versions
            entry.state, entry.reason = READY, ""
            self._measured(entry, files, grown, old)
            self._changed(name)
            log.info("model '%s' ready, versions %s", name, sorted(new_versions))
            for served in old.values():
                await served.close(drain=True, timeout_s=self._drain_timeout)

    async def _unload(self, name: str, reason: str) -> None:
        entry = self._models.get(name)
        if entry is None:
            self._model_dir(name)  # NOT_FOUND vs. merely not loaded
            return
        async with entry.lock:
            old, entry.versions = entry.versions, {}
            entry.state, entry.reason = UNLOADING, ""
            self._changed(name)
            for served in old.values():
                await served.close(drain=True, timeout_s=self._drain_timeout)
            self._forget_memory(name, old)
            entry.state, entry.reason = UNAVAILABLE, reason
            self._failures.pop(name, None)
            if old:
                await asyncio.to_thread(self.memory.release)
            log.info("model '%s' unloaded", name)

    # -- memory (on-demand budgets) ---------------------------------------------------

    def _measured(
        self,
        entry: ModelEntry,
        files: dict[int, int],
        grown: dict[str, int],
        old: dict[int, ModelVersion],
    ) -> None:
        """Keep what the load measured, split evenly across the versions it built. A
        host measure below the version's files (memory freed earlier and reused) is
        raised to them where an instance runs on the CPU: its weights are there once
        at least, and counting less would let the next load pass the budget."""
        self._forget_memory(entry.name, {v: m for v, m in old.items() if v not in entry.versions})
        share = max(1, len(entry.versions))
        for number, served in entry.versions.items():
            memory = {device: size // share for device, size in grown.items()}
            if HOST in memory and any(d == HOST for d in _devices_of(served)):
                memory[HOST] = max(memory[HOST], files.get(number, 0))
            entry.memory[number] = memory
            for device, size in memory.items():
                self._metrics.model_memory.labels(entry.name, str(number), device).set(size)
        steady = sum(m.get(HOST, 0) for m in entry.memory.values() if m)
        entry.peak[HOST] = max(entry.peak.get(HOST, 0), steady)
        total = files[_WHOLE]
        if total >= _RATIO_MIN_FILES:  # below, a load's fixed costs swamp the ratio
            self._per_file_byte = max(self._per_file_byte, entry.peak[HOST] / total)

    def _forget_memory(self, name: str, versions: dict[int, ModelVersion]) -> None:
        """The versions' gauges go; their measures stay as the next load's estimate."""
        entry = self._models.get(name)
        for number in versions:
            for device in [] if entry is None else entry.memory.get(number, {}):
                with contextlib.suppress(KeyError):
                    self._metrics.model_memory.remove(name, str(number), device)

    def is_loaded(self, name: str) -> bool:
        entry = self._models.get(name)
        return entry is not None and bool(entry.versions)

    def loaded_names(self) -> list[str]:
        return [name for name, entry in self._models.items() if entry.versions]

    def memory_held(self, name: str) -> dict[str, int]:
        """Device -> bytes the model's loaded versions measured at their load."""
        entry = self._models.get(name)
        held: dict[str, int] = {}
        if entry is not None:
            for number in entry.versions:
                for device, size in entry.memory.get(number, {}).items():
                    held[device] = held.get(device, 0) + size
        return held

    def estimate(self, name: str) -> dict[str, int]:
        """Blocking (reads the disk): the most loading the model will take while it runs,
        by device: its last load's peak, else its files' size as host memory, scaled by
        the largest peak per file byte that loads so far measured (1 before any)."""
        entry = self._models.get(name)
        if entry is not None and entry.peak:
            return dict(entry.peak)
        return {HOST: int(files_size(self._model_dir(name)) * self._per_file_byte)}

    def is_loaded_ensemble(self, name: str) -> bool:
        """The model is loaded and is an ensemble (its loaded spec: no disk read)."""
        entry = self._models.get(name)
        return entry is not None and _ensembles(entry.versions)

    def model_busy(self, name: str) -> bool:
        """A version of the model has requests queued or running, or it is loading or
        unloading."""
        entry = self._models.get(name)
        if entry is None:
            return False
        if entry.lock.locked():
            return True
        for served in entry.versions.values():
            if isinstance(served, ServedModel) and (served.inflight or served.queue.depth):
                return True
        return False

    # -- single versions, for rollouts -------------------------------------------------

    def versions_on_disk(self, name: str) -> list[str]:
        return [str(v) for v in _versions_on_disk(self._model_dir(name))]

    def loaded_versions(self, name: str) -> list[str]:
        entry = self._models.get(name)
        return [] if entry is None else [str(v) for v in sorted(entry.versions)]

    def default_version(self, name: str) -> str:
        """The version an unversioned request gets; ModelNotReady when none serves."""
        entry = self._models.get(name)
        served = None if entry is None else entry.default()
        if served is None:
            self._model_dir(name)  # NOT_FOUND for a model not in the repository
            raise ModelNotReady(f"model '{name}' has no version serving")
        return str(served.version)

    def model_dir(self, name: str) -> Path:
        return self._model_dir(name)

    def set_default(self, name: str, version: str | None) -> None:
        """Pin the version unversioned requests get; None: the latest, as Triton."""
        entry = self._models.setdefault(name, ModelEntry(name))
        entry.pinned = None if version is None else _version_number(version)

    def pinned_default(self, name: str) -> str | None:
        entry = self._models.get(name)
        return None if entry is None or entry.pinned is None else str(entry.pinned)

    async def ensure_loaded(self, name: str, version: str) -> None:
        """Load one version beside those serving, whatever the version_policy says;
        it stays loaded across reloads until unload_version."""
        await self._owned(self._add_version(name, _version_number(version)))

    async def unload_version(self, name: str, version: str) -> None:
        await self._owned(self._remove_version(name, _version_number(version)))

    async def _add_version(self, name: str, number: int) -> None:
        model_dir = self._model_dir(name)
        if number not in _versions_on_disk(model_dir):
            raise ModelNotFound(f"model '{name}' has no version {number} in {model_dir}")
        entry = self._models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            entry.extra.add(number)
            if number in entry.versions:
                return
            try:
                try:
                    built = await asyncio.to_thread(self._build, model_dir, set(), number)
                except _VersionFailed as failed:
                    raise failed.cause from None
            except ConvoyError:
                entry.extra.discard(number)
                self._count_failure(name, number)
                raise
            except Exception as exc:  # a runtime refusing the model file
                entry.extra.discard(number)
                self._count_failure(name, number)
                raise ConfigError(str(model_dir), "model file", str(exc)) from exc
            _check_ensembles(built)
            served = built[number]
            served.start()
            entry.versions[number] = served
            entry.state, entry.reason = READY, ""
            self._changed(name)
            log.info("model '%s' version %d loaded beside %s", name, number, sorted(entry.versions))

    async def _remove_version(self, name: str, number: int) -> None:
        entry = self._models.get(name)
        if entry is None:
            return
        async with entry.lock:
            entry.extra.discard(number)
            served = entry.versions.pop(number, None)
            if served is None:
                return
            if not entry.versions:
                entry.state, entry.reason = UNAVAILABLE, "unloaded"
            self._changed(name)
            await served.close(drain=True, timeout_s=self._drain_timeout)
            log.info("model '%s' version %d unloaded", name, number)

    async def close(self, timeout_s: float | None = None) -> None:
        """Unload every model within timeout_s (what is left of a shutdown's grace
        period) as well as the repository's own bound: loads and unloads in progress
        first (a model still loading after that is left as it is: the process is
        exiting), then the ensembles, all at once, so that their requests in flight
        finish their steps, then every other model at once."""
        bound = self._drain_timeout
        if timeout_s is not None:
            bound = timeout_s if bound is None else min(bound, timeout_s)
        loop = asyncio.get_running_loop()
        deadline = None if bound is None else loop.time() + bound

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=left())
        busy = sorted(name for name, entry in self._models.items() if entry.lock.locked())
        if busy:
            log.warning("at shutdown, models %s were still loading or unloading: left", busy)
        names = [name for name in self._models if name not in busy]
        ensembles = [name for name in names if self._is_ensemble(name)]
        for group in (ensembles, [name for name in names if name not in ensembles]):
            self._drain_timeout = left()
            await asyncio.gather(*(self.unload(name) for name in group))

    def _load_failed(self, name: str, version: int | None, error: ConvoyError) -> None:
        self._failures[name] = LoadFailure(version, error)
        self._count_failure(name, version)

    def _count_failure(self, name: str, version: int | None) -> None:
        label = "" if version is None else str(version)
        self._metrics.model_load_failures.labels(name, label).inc()

    def _changed(self, name: str) -> None:
        if self.on_change is not None:
            self.on_change(name)

    def _is_ensemble(self, name: str) -> bool:
        try:
            return read_model_config(self.root / name).platform == ENSEMBLE
        except ConvoyError:
            return False

    def _model_dir(self, name: str) -> Path:
        # Model names come from clients: never let one point outside the repository.
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise InvalidInput(f"model_name '{name}' is not a valid model directory name")
        if name.startswith("."):  # hidden folders are not models (on_disk's rule)
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}")
        path = (self.root / name).resolve()
        if path.parent != self.root or not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}")
        return path

    # -- building (worker thread) ----------------------------------------------

    def _build_sampled(
        self, model_dir: Path, extra: set[int]
    ) -> tuple[dict[int, ModelVersion], dict[str, int]]:
        """Blocking: _build with its peak memory sampled. The sampler starts, takes its
        first sample and is joined here, off the loop: a GPU probe's read may be the
        process's first CUDA call, which initialises CUDA."""
        with PeakSampler(self.memory) as sampled:
            versions = self._build(model_dir, extra)
        return versions, sampled.peak

    def _build(
        self, model_dir: Path, extra: set[int], only: int | None = None
    ) -> dict[int, ModelVersion]:
        """Build the versions the version_policy selects plus `extra` (those on disk),
        or just version `only`."""
        config = read_model_config(model_dir)
        config_path = str(model_dir / CONFIG_FILENAME)
        versions_on_disk = _versions_on_disk(model_dir)
        backend = infer_backend(config, [model_dir / str(v) for v in versions_on_disk])
        if backend and not config.backend and not config.platform:
            config.backend = backend
        if only is not None:
            versions = [only] if only in versions_on_disk else []
        else:
            selected = version_policy_of(config, config_path).select(versions_on_disk)
            versions = sorted(set(selected) | (extra & set(versions_on_disk)))
        if not versions:
            raise ConfigError(
                config_path,
                "version_policy",
                f"no version directory to serve (found {versions_on_disk or 'none'})",
            )
        if not config.input or not config.output:
            _autocomplete(config, backend or "", model_dir / str(versions[-1]))
        spec = validate_model_config(config, config_path, model_dir.name)
        _show_instance_groups(config, spec)
        served: dict[int, ModelVersion] = {}
        try:
            for version in versions:
                try:
                    served[version] = self._build_version(spec, config, model_dir, version)
                except Exception as exc:
                    raise _VersionFailed(version, exc) from exc
        except BaseException:
            for model in served.values():
                model.discard()
                if model.monitoring_handle is not None:
                    self.monitors.detach(model.monitoring_handle)
            raise
        return served

    def _build_version(
        self, spec: ModelSpec, config: mc.ModelConfig, model_dir: Path, version: int
    ) -> ModelVersion:
        if spec.ensemble:
            metrics = self._metrics.for_model(spec.name, str(version))
            path = str(model_dir / CONFIG_FILENAME)
            return EnsembleModel(
                spec, version, config, metrics, self.get, path, self._clock, self._run_step
            )
        model_path = model_dir / str(version) / spec.default_model_filename
        failed = self.health.failed  # no new instance on a GPU lost to a fatal fault
        devices = [d for g in spec.instance_groups for d in place_group(spec.name, g, failed)]
        threads = default_threads(len(devices))
        labels = _read_labels(spec, model_dir)
        # parameters feast_*: the Feast repository checked before anything is built, then
        # each runtime put behind a lookup.
        features = self._features(spec, model_dir)
        if features is not None:
            spec = features.served(spec)
        # First: a bad drift reference fails the load before any runtime starts.
        monitoring = self._attach_monitoring(spec, model_dir, version, labels)

        def build(device: str) -> Backend:
            if features is None:
                return load_backend(spec, model_path, device, threads)
            runtime = load_backend(features.runtime(spec), model_path, device, threads)
            try:
                return features.wrap(runtime, spec.batched)
            except BaseException:  # the runtime is not an instance yet: nobody else closes it
                runtime.close()
                raise

        instances: list[ModelInstance] = []
        try:
            for index, device in enumerate(devices):
                backend = build(device)
                name = f"{spec.name}-v{version}-{index}"
                instances.append(ModelInstance(name, backend, spec.softmax_outputs, labels))
            warm_up([i.backend for i in instances], spec, model_dir)
        except BaseException:
            for instance in instances:
                instance.close()
            self.monitors.detach(monitoring)
            raise
        metrics = self._metrics.for_model(spec.name, str(version))
        replacements = itertools.count()

        def replacement(device: str) -> ModelInstance:
            name = f"{spec.name}-v{version}-r{next(replacements)}"
            backend = build(device)
            warm_up([backend], spec, model_dir)
            return ModelInstance(name, backend, spec.softmax_outputs, labels)

        pool = InstancePool(
            instances,
            replacement,
            spec.execution_timeout_s,
            cpu_spill_after_s=spec.cpu_spill_after_s,
            health=self.health,
        )
        served = ServedModel(
            spec, version, config, pool, metrics, self._clock, self.limits, self.outcomes
        )
        served.labels = labels
        if self.batch_tracing is not None:
            served.queue.tracer = self.batch_tracing(spec.name, str(version))
        served.attach_monitoring(self.monitors, monitoring)
        return served

    def _features(self, spec: ModelSpec, model_dir: Path) -> FeatureSource | None:
        if spec.features is None:
            return None
        config_path = str(model_dir / CONFIG_FILENAME)
        return open_features(spec, model_dir, config_path, self._metrics.features)

    def _attach_monitoring(
        self, spec: ModelSpec, model_dir: Path, version: int, labels: dict[str, list[str]]
    ) -> ModelMonitoring:
        text = spec.options.text
        tokenizer = tokenizer_hook(model_dir / str(version) / text.tokenizer) if text else None
        config_path = str(model_dir / CONFIG_FILENAME)
        # Prepared, not registered: ServedModel.start() activates it once the version
        # serves, so a load that fails before then leaves the serving version's alone.
        return self.monitors.prepare(
            spec, str(version), model_dir, config_path, labels, tokenizer=tokenizer
        )


def _ensembles(versions: dict[int, ModelVersion]) -> bool:
    return bool(versions) and all(served.spec.ensemble for served in versions.values())


def _check_ensembles(versions: dict[int, ModelVersion]) -> None:
    """On the loop, before any starts: an ensemble's steps against the loaded models."""
    try:
        for version in versions.values():
            if isinstance(version, EnsembleModel):
                version.check()
    except ConvoyError:
        for version in versions.values():
            version.discard()
        raise


def _show_instance_groups(config: mc.ModelConfig, spec: ModelSpec) -> None:
    """The served config says where instances run, as Triton's does: a missing
    instance_group filled in, KIND_AUTO resolved."""
    del config.instance_group[:]
    for group in spec.instance_groups:
        kind, gpus = resolved_kind(group)
        config.instance_group.add(
            name=group.name,
            kind=mc.ModelInstanceGroup.Kind.Value(kind),
            count=group.count,
            gpus=gpus,
        )


def _read_labels(spec: ModelSpec, model_dir: Path) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {}
    for output in spec.outputs:
        if not output.label_filename:
            continue
        path = (model_dir / output.label_filename).resolve()
        if path.parent != model_dir.resolve() or not path.is_file():
            raise ConfigError(
                str(model_dir / CONFIG_FILENAME),
                f"output '{output.name}'.label_filename",
                f"'{output.label_filename}' is not a file in the model directory",
            )
        labels[output.name] = path.read_text().splitlines()
    return labels


def _versions_on_disk(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _version_number(version: str) -> int:
    try:
        return int(version)
    except ValueError:
        raise InvalidInput(f"model version '{version}' is not an integer") from None


def _looks_like_model(path: Path) -> bool:
    return (path / CONFIG_FILENAME).exists() or any(
        p.is_dir() and p.name.isdigit() for p in path.iterdir()
    )


def _autocomplete(config: mc.ModelConfig, backend: str, version_dir: Path) -> None:
    """Fill missing inputs/outputs from the model file, as Triton's auto-complete does."""
    filename = config.default_model_filename or {"onnxruntime": "model.onnx"}.get(backend, "")
    signature: BackendSignature | None = probe_signature(backend, version_dir / filename)
    if signature is None:
        return
    skip = 1 if config.max_batch_size > 0 else 0
    for target, tensors in ((config.input, signature.inputs), (config.output, signature.outputs)):
        if len(target):
            continue
        for tensor in tensors:
            target.add(
                name=tensor.name,
                data_type=mc.DataType.Value(WIRE_TO_CONFIG[tensor.datatype]),
                dims=list(tensor.dims[skip:]),
            )


_RATIO_MIN_FILES = 16 << 20
_WHOLE = -1  # _files_by_version's key for the whole model directory


def _files_by_version(model_dir: Path, versions: Iterable[int]) -> dict[int, int]:
    """Blocking: bytes of files per version folder, and of the whole model (_WHOLE)."""
    sizes = {number: files_size(model_dir / str(number)) for number in versions}
    sizes[_WHOLE] = files_size(model_dir)
    return sizes


def _devices_of(served: ModelVersion) -> list[str]:
    return served.devices if isinstance(served, ServedModel) else []
