"""On-demand loading (`--model-control-mode on-demand`, docs/models.md): every model in
the repository is listed, and loads on its first request.

The loader owns one load task per model: a request for a model that is not loaded
starts it, or joins the one running, and waits for it within its deadline (else
`--load-wait-secs`); the load goes on for the next caller if a waiter leaves. A failed
load fails its waiters with its error and is tried again only by a later request; while
the model's files are unchanged since, that retry evicts nothing: it runs only if the
model fits as things are, else fails at once with the remembered error (a broken model
must not empty the server of healthy ones, request after request).

Every request holds its model (a reference count) from its admission to its answer, so
eviction never takes a model with a request queued or running: a model chosen while
busy takes no new requests (they wait for its reload) and goes once those it admitted
are answered. Idle models are chosen before busy ones. Loads run
one at a time: each one's measured memory is its own, and each budget check sees the
evictions before it finished (DESIGN §14). Evictions follow EvictionPolicy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..batching.queue import Clock
from ..errors import ConvoyError, DeadlineExceeded, Overloaded, Unavailable
from ..metrics import Metrics
from .eviction import EvictionPolicy, Resident, Shortfall
from .manager import ModelRepository
from .memory import HOST
from .poll import Signature, signature

log = logging.getLogger(__name__)

NOT_LOADED = "not loaded"
_BUDGET_FLAGS = {True: "--memory-budget-mib", False: "--gpu-memory-budget-mib"}


@dataclass(frozen=True)
class LoadFailed:
    """A model's last load failed with `error`, its files then being `files`."""

    files: Signature
    error: BaseException


class OnDemandLoader:
    def __init__(
        self,
        repository: ModelRepository,
        policy: EvictionPolicy,
        metrics: Metrics,
        *,
        load_wait_s: float,
        pinned: Callable[[str], bool],
        settle: Callable[[], object] = gc.collect,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self._repo = repository
        self._policy = policy
        self._metrics = metrics
        self._load_wait_s = load_wait_s
        self._pinned = pinned
        # Collects an evicted model's cyclic garbage at once (the heap settler's, where
        # the heap is frozen): its memory must be free before the next load measures.
        self._settle = settle
        self._clock = clock
        self._holds: dict[str, int] = {}  # model -> requests admitted to it, unanswered
        self._waiting: dict[str, int] = {}  # model -> requests waiting for its load
        self._evicting: set[str] = set()  # chosen to go: new requests wait, then reload
        self._drained: dict[str, asyncio.Event] = {}  # evicting, set when its holds end
        self._last_used: dict[str, int] = {}  # model -> when its last hold ended (ns)
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, LoadFailed] = {}  # model -> its last load's failure
        self._uncollected = False  # evictions since the last collection
        self._one_load = asyncio.Lock()
        self._idle: asyncio.Task[None] | None = None
        repository.absent_reason = NOT_LOADED

    # -- the request path -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def held(self, name: str, deadline_ns: int | None) -> AsyncIterator[None]:
        """Hold the model for one request: loaded first if it is not (waiting until the
        request's `deadline_ns`, time.monotonic_ns, else --load-wait-secs), never evicted
        until the request is answered. A model chosen for eviction takes no new request:
        those wait for its reload."""
        loop = asyncio.get_running_loop()
        if deadline_ns is None:
            wait_s = self._load_wait_s
        else:
            wait_s = (deadline_ns - time.monotonic_ns()) / 1e9
        deadline = loop.time() + wait_s
        while not self._repo.is_loaded(name) or name in self._evicting:
            await self._wait_loaded(name, deadline - loop.time())
        self._holds[name] = self._holds.get(name, 0) + 1  # no await since the check
        try:
            yield
        finally:
            left = self._holds[name] - 1
            if left:
                self._holds[name] = left
            else:
                del self._holds[name]
                drained = self._drained.get(name)
                if drained is not None:
                    drained.set()
            self._last_used[name] = self._clock()

    async def _wait_loaded(self, name: str, wait_s: float) -> None:
        task = self._loading.get(name)
        if task is None:
            self._repo.model_dir(name)  # NOT_FOUND, INVALID_ARGUMENT: now, no task
            task = asyncio.get_running_loop().create_task(self._load(name))
            self._loading[name] = task
            task.add_done_callback(lambda done: self._loaded(name, done))
        waiting = self._metrics.model_waiting.labels(name)
        waiting.inc()
        # Waiters make a model busy: just loaded, it is not evicted before they run.
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            await asyncio.wait_for(asyncio.shield(task), max(0.0, wait_s))
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{name}' did not load in time (the request's deadline, else "
                f"--load-wait-secs {self._load_wait_s:g}); its load goes on"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                stopping = f"model '{name}' was not loaded: the server is stopping"
                raise Unavailable(stopping) from None
            raise
        finally:
            waiting.dec()
            left = self._waiting[name] - 1
            if left:
                self._waiting[name] = left
            else:
                del self._waiting[name]

    def _loaded(self, name: str, task: asyncio.Task[None]) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]  # a failed load is tried again by the next request
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            message = error.message if isinstance(error, ConvoyError) else repr(error)
            log.warning("on-demand load of model '%s' failed: %s", name, message)

    async def _load(self, name: str) -> None:
        # What can never fit is refused now, not after the loads queued before it.
        need = await asyncio.to_thread(self._repo.estimate, name)
        plan = self._policy.plan(need, self._residents(exclude=name), include_busy=True)
        if plan.shortfall is not None:
            raise Overloaded(_refusal(name, plan.shortfall))
        async with self._one_load:
            if self._repo.is_loaded(name):
                return  # loaded meanwhile (RepositoryModelLoad)
            need = await asyncio.to_thread(self._repo.estimate, name)
            files = await asyncio.to_thread(signature, self._repo.model_dir(name))
            failed = self._failed.get(name)
            if failed is not None and failed.files == files:
                # The same files failed: try again only where nothing need go for it.
                plan = self._policy.plan(need, self._residents(exclude=name))
                if plan.victims or plan.shortfall is not None:
                    raise failed.error.with_traceback(None)
            else:
                await self._make_room(name, need)
            await self._load_now(name, "first_request", files)

    async def _load_now(self, name: str, reason: str, files: Signature) -> None:
        """Under _one_load, room made: load, remembering a failure with its files."""
        await self._collected()  # evicted models' memory free before this load measures
        try:
            await self._repo.load(name, reason=reason)
        except Exception as exc:
            self._failed[name] = LoadFailed(files, exc)
            raise
        self._failed.pop(name, None)
        self._last_used[name] = self._clock()

    async def load(self, name: str, reason: str = "explicit") -> None:
        """A load not asked for by a request (RepositoryModelLoad, --load-model): one at
        a time with the others, after making room within the budget."""
        self._repo.model_dir(name)  # NOT_FOUND, INVALID_ARGUMENT: before the queue
        async with self._one_load:
            need = await asyncio.to_thread(self._repo.estimate, name)
            files = await asyncio.to_thread(signature, self._repo.model_dir(name))
            await self._make_room(name, need)  # an operator asked: tried whatever failed
            await self._load_now(name, reason, files)

    async def _make_room(self, name: str, need: dict[str, int]) -> None:
        """Evict, one at a time and planning again after each (a model may be asked
        for meanwhile), until `need` fits. Idle models first; where they are not enough,
        busy ones too, once their requests are answered. Overloaded only when even that
        cannot make room (the pinned models and the budget leave too little). Plans
        read the memory measured at load, so no collection is needed between them."""
        while True:
            residents = self._residents(exclude=name)
            plan = self._policy.plan(need, residents)
            if plan.shortfall is not None:
                plan = self._policy.plan(need, residents, include_busy=True)
                if plan.shortfall is not None:
                    raise Overloaded(_refusal(name, plan.shortfall))
            if not plan.victims:
                return
            await self._evict(plan.victims[0], "memory")

    async def _collected(self) -> None:
        """After evictions, before the next load measures: collect the evicted models'
        cyclic garbage once and trim, so resident memory shows them gone (one pause,
        ~0.3 s with a frozen heap of 250k objects). On the loop: gc.collect holds the
        GIL whatever thread runs it, and the heap settler's timer belongs to the loop;
        so collections are kept few instead: none per idle pass (the repository's
        unload already trims; where the heap is frozen its settler collects once the
        repository is quiet) and at most one per load, only where something was
        evicted since the last."""
        if not self._uncollected:
            return
        self._uncollected = False
        self._settle()
        await asyncio.to_thread(self._repo.memory.release)

    async def _evict(self, name: str, reason: str) -> None:
        """New requests wait (for its reload), those admitted are answered, then it goes."""
        log.info("evicting model '%s' (%s)", name, reason)
        self._evicting.add(name)
        try:
            if name in self._holds:
                drained = self._drained[name] = asyncio.Event()
                await drained.wait()  # set by the last hold's release
            await self._repo.unload(name, reason=NOT_LOADED)  # drains any other run
            self._uncollected = True
        finally:
            self._evicting.discard(name)
            self._drained.pop(name, None)
        self._metrics.model_evictions.labels(name, reason).inc()

    def _residents(self, exclude: str = "") -> list[Resident]:
        now = self._clock()
        return [
            Resident(
                name,
                self._repo.memory_held(name),
                self._last_used.setdefault(name, now),  # loaded by another door
                busy=name in self._holds or name in self._waiting or self._repo.model_busy(name),
                pinned=self._pinned(name),
            )
            for name in self._repo.loaded_names()
            # Never an ensemble: it holds no weights, and draining one whose request
            # waits in a step for this very load would wait out the load's deadline.
            if name != exclude and not self._repo.is_loaded_ensemble(name)
        ]

    # -- idle eviction ---------------------------------------------------------------

    def start(self) -> None:
        """Unload idle models from now on (when --evict-idle-secs is set)."""
        if self._policy.idle_ns is not None:
            period = min(1.0, self._policy.idle_ns / 4e9)
            self._idle = asyncio.get_running_loop().create_task(self._evict_idle(period))

    async def _evict_idle(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.evict_idle()
            except ConvoyError as exc:
                log.warning("idle eviction failed: %s", exc.message)

    async def evict_idle(self) -> None:
        """One pass: unload each model idle for --evict-idle-secs that nothing holds."""
        async with self._one_load:
            for name in self._policy.idle(self._residents()):
                # Checked again: an earlier unload in this pass let requests in.
                if name not in self._holds and not self._repo.model_busy(name):
                    await self._evict(name, "idle")  # collected before the next load

    async def stop(self) -> None:
        """Stop evicting and starting loads (their waiters are answered UNAVAILABLE); a
        load the repository has begun is its own, and its close waits for it."""
        tasks = [*self._loading.values(), *([self._idle] if self._idle is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._idle = None


def prime_runtimes() -> None:
    """Blocking: pay the process's one-time costs before any load is measured (GPU
    discovery imports torch, ~150 MiB resident; ONNX Runtime's import), so they count
    in the server's base, not against the first model loaded."""
    from ..scheduling.devices import cuda_device_count

    cuda_device_count()
    if importlib.util.find_spec("onnxruntime") is not None:
        _first_onnx_session()


def _first_onnx_session() -> None:
    """ONNX Runtime builds its process-wide environment (~40 MiB resident) with the
    first session: build it with a one-node model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "prime",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)  # what older runtimes read
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _refusal(name: str, short: Shortfall) -> str:
    flag = _BUDGET_FLAGS[short.device == HOST]
    where = "host memory" if short.device == HOST else f"memory on {short.device}"
    return (
        f"model '{name}' needs about {_mib(short.need)} of {where}, which {flag} "
        f"{short.budget >> 20} cannot hold: {_mib(short.kept)} of it is held by models in use "
        "or pinned"
    )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
