"""RolloutController: owns every rollout, applies their transitions, answers the hot path.

The hot path sees two calls: route() (one dict lookup for a model without a
rollout; a bucket and a comparison with one) and record() (counters and a ring
write). Control calls (start, promote, rollback, pause, resume, set_weight) and
tick() make the decisions; their side effects on the repository go through the
small RolloutRepository protocol, so this module knows nothing of how models load.

Persist, then apply: a change of serving is written to the state directory
before routing sees it, so a change that cannot be saved is not made and a
refused control call leaves serving as it was. Rollbacks are the exception: back
to stable never waits on the disk (a full or read-only state directory must not
keep a failing candidate in front of callers); their save is retried every tick.

Threads: everything here runs on the event loop but snapshot(), which the
metrics scrape calls from its own thread. For it the loop never resizes a dict
in place (a new key gets a new dict) and never changes the phase or weights of a
rollout in place (a change commits a copy): one read of an attribute is a state
that stays whole.

Default pinning: from the moment a rollout starts, the controller tells the
repository which version is the default (set_default), and keeps telling it
after the rollout has ended (the winner), across restarts too. Without that a
reload or a restart would apply Triton's "latest version" rule and could put
a rolled-back candidate in front of every caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import ConvoyError, FailedPrecondition, InvalidInput, ModelNotFound, Unavailable
from ..monitoring.objectives import Kind, ModelObjectives, Objective
from .analysis import Rollout, Transition
from .compare import Array, OutputDivergence, compare_outputs, divergence_score
from .policy import TrafficPolicy
from .spec import Phase, ReplayGate, RolloutSpec, Strategy
from .store import RolloutStore
from .window import BucketCounts, WindowStats

log = logging.getLogger(__name__)

SHADOW_INFLIGHT = 8  # mirrored runs in flight per model; past it, shadow work is shed
K = TypeVar("K")
V = TypeVar("V")
_COMPARES_BOTH_WAYS = (Strategy.CANARY, Strategy.BLUE_GREEN)
REFUSED = "refused"  # the phase status() shows for a start its replay gate refused

# The replay gate: (model, baseline, candidate, gate) -> the replay report as JSON (its
# "passed" and "reasons" read here). Both versions are loaded when it is called;
# ConvoyError when there is nothing to replay. The server wires it (capture/gate.py).
ReplayHook = Callable[[str, str, str, ReplayGate], Awaitable[dict[str, Any]]]


class RolloutRepository(Protocol):
    """What the controller needs from the model repository. Versions are strings."""

    def versions_on_disk(self, model: str) -> list[str]:
        """Versions present in the repository; ModelNotFound for an unknown model."""
        ...

    def loaded_versions(self, model: str) -> list[str]:
        """Versions loaded and serving now."""
        ...

    def default_version(self, model: str) -> str:
        """The version an unversioned request gets now (the pin if set, else Triton's rule)."""
        ...

    def set_default(self, model: str, version: str | None) -> None:
        """Pin the default version; None: back to Triton's rule. Never blocks."""
        ...

    def pinned_default(self, model: str) -> str | None:
        """The pinned default version; None: none is pinned (Triton's rule)."""
        ...

    async def ensure_loaded(self, model: str, version: str) -> None:
        """Load and warm up one version, whatever version_policy says; ConvoyError on failure."""
        ...

    async def unload_version(self, model: str, version: str) -> None:
        """Stop routing to one version, drain its queue, free it."""
        ...


@dataclass(frozen=True)
class RolloutSnapshot:
    """The figures the metrics scrape exports, taken at one moment."""

    rollouts: tuple[tuple[str, str, dict[str, float]], ...]  # model, phase, weights; by model
    events: dict[tuple[str, str], int]  # (model, event) -> count
    shadow_shed: dict[tuple[str, str], int]  # (model, version) -> count
    # (model, version, output) -> cumulative (bound, count) buckets and their sum
    divergence: dict[tuple[str, str, str], tuple[list[tuple[str, int]], float]]


@dataclass(frozen=True)
class RolloutStatus:
    model: str
    strategy: str
    phase: str
    stable: str
    candidate: str
    weights: dict[str, float]  # version -> percent of unversioned requests
    reason: str  # why the phase last changed, naming the gate and figure
    analysis: str  # the last verdict of the gates
    step: int  # 1-based; 0 for strategies without steps
    steps: tuple[float, ...]
    shadow_fraction: float
    windows: dict[str, WindowStats]  # version -> its figures in the current window
    replay: dict[str, Any] | None = None  # the replay gate's report, if the start had one


class RolloutController:
    def __init__(
        self,
        repository: RolloutRepository,
        store: RolloutStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        shadow_inflight: int = SHADOW_INFLIGHT,
        replay: ReplayHook | None = None,
    ) -> None:
        self._repo = repository
        # None: the server writes no capture, and a start with a replay gate is refused.
        self.replay = replay
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._shadow_limit = shadow_inflight
        self._rollouts: dict[str, Rollout] = {}
        # The models' declared SLOs (the server's, read at start): the max_burn_rate gate.
        self.objectives: Mapping[str, ModelObjectives] = {}
        self._routes: dict[str, TrafficPolicy] = {}  # active rollouts only: the hot path's map
        self._shadow_inflight: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # per model: control calls await loads
        self._unsaved: set[str] = set()  # models whose applied state the store refused
        self._retiring: dict[str, asyncio.Task[None]] = {}  # model -> its loser draining
        # model -> the last start its replay gate refused, until a start succeeds
        self._refused: dict[str, RolloutStatus] = {}
        self.events: dict[tuple[str, str], int] = {}  # (model, event) -> count
        self.shadow_shed: dict[tuple[str, str], int] = {}  # (model, version) -> count
        self.divergence: dict[tuple[str, str, str], BucketCounts] = {}  # model, version, output

    # -- hot path (event loop, no awaits) --------------------------------------------

    def route(self, model: str, key: str | None = None) -> str | None:
        """The version for a request that names none; None: the repository's default."""
        policy = self._routes.get(model)
        return None if policy is None else policy.choose(key, self._rng)

    def needs_key(self, model: str) -> bool:
        """True while the model runs an A/B rollout: only then is the key worth reading."""
        policy = self._routes.get(model)
        return policy is not None and policy.sticky

    def versions_in_use(self, model: str) -> set[str]:
        """Versions a reload of the model must keep loaded, whatever its version_policy:
        both arms while active, the winner and a still-warm loser once ended."""
        rollout = self._rollouts.get(model)
        if rollout is None:
            return set()
        if rollout.phase.active or not rollout.retired:
            return {rollout.stable, rollout.candidate}
        return {rollout.winner}

    def record(
        self,
        model: str,
        version: str,
        error: BaseException | None,
        queue_ns: int = 0,
        compute_ns: int = 0,
    ) -> None:
        """One finished run of a version: routed, pinned or mirrored; result or error."""
        rollout = self._rollouts.get(model)
        if rollout is None or not rollout.phase.active:
            return
        window = rollout.windows.get(version)
        if window is not None:
            window.record(error, queue_ns, compute_ns)

    def mirror(self, model: str, served: str) -> str | None:
        """The version to also run this request on, off the caller's path, or None.

        Bounded: past `shadow_inflight` mirrored runs in flight, shadow work is
        shed (counted), so it can never queue up behind callers. Every non-None
        answer must be followed by exactly one mirror_done() (ShadowRunner does).
        """
        rollout = self._rollouts.get(model)
        if rollout is None or not rollout.phase.active or rollout.spec.shadow_fraction <= 0:
            return None
        if served == rollout.stable:
            other = rollout.candidate
        elif served == rollout.candidate and rollout.spec.strategy in _COMPARES_BOTH_WAYS:
            other = rollout.stable  # stable is kept warm: it can answer for comparison
        else:
            return None
        if self._rng.random() >= rollout.spec.shadow_fraction:
            return None
        inflight = self._shadow_inflight.get(model, 0)
        if inflight >= self._shadow_limit:
            rollout.windows[other].shadow_shed += 1
            self.shadow_shed = _counted(self.shadow_shed, (model, other))
            return None
        self._shadow_inflight[model] = inflight + 1
        return other

    def mirror_done(self, model: str) -> None:
        """A mirrored run finished, failed or was cancelled: free its budget.

        Its outcome is counted like any run's, by record() from the same hook.
        """
        self._shadow_inflight[model] = max(0, self._shadow_inflight.get(model, 0) - 1)

    def record_comparison(
        self, model: str, outputs: Mapping[str, Mapping[str, Array]]
    ) -> dict[str, OutputDivergence]:
        """Compare two versions' outputs for one request (version -> outputs).

        numpy over whole outputs: for large ones run compare_outputs() in a worker
        thread and pass its result to record_divergences() on the loop.
        """
        rollout = self._rollouts.get(model)
        if rollout is None or rollout.stable not in outputs or rollout.candidate not in outputs:
            return {}
        divergences = compare_outputs(outputs[rollout.stable], outputs[rollout.candidate])
        self.record_divergences(model, divergences)
        return divergences

    def compared_versions(self, model: str) -> tuple[str, str]:
        """(stable, candidate) of the model's rollout: reference first; ("", "") if none."""
        rollout = self._rollouts.get(model)
        return ("", "") if rollout is None else (rollout.stable, rollout.candidate)

    def record_divergences(self, model: str, divergences: Mapping[str, OutputDivergence]) -> None:
        rollout = self._rollouts.get(model)
        if rollout is None or not rollout.phase.active or not divergences:
            return
        candidate = rollout.candidate
        rows = sum(d.top1_rows for d in divergences.values())
        agreed = sum(d.top1_agreed for d in divergences.values())
        rollout.windows[candidate].record_divergence(divergence_score(divergences), rows, agreed)
        for output, divergence in divergences.items():
            key = (model, candidate, output)
            counts = self.divergence.get(key)
            if counts is None:
                counts = BucketCounts()
                self.divergence = _with(self.divergence, key, counts)
            counts.observe(divergence.max_abs_diff)

    # -- control ---------------------------------------------------------------------

    async def start(self, model: str, version: str, spec: RolloutSpec) -> RolloutStatus:
        async with self._lock(model):
            return await self._start(model, version, spec)

    async def _start(self, model: str, version: str, spec: RolloutSpec) -> RolloutStatus:
        on_disk = self._repo.versions_on_disk(model)  # ModelNotFound for an unknown model
        if version not in on_disk:
            raise ModelNotFound(
                f"model '{model}' has no version {version} (in the repository: "
                f"{', '.join(on_disk) or 'none'})"
            )
        existing = self._rollouts.get(model)
        if existing is not None and existing.phase.active:
            raise InvalidInput(
                f"model '{model}' already has a {existing.spec.strategy.value} rollout of "
                f"version {existing.candidate} ({existing.phase.value}); promote or roll "
                "it back first"
            )
        stable = self._repo.default_version(model)
        if stable == version:
            raise InvalidInput(f"version {version} of model '{model}' already serves by default")
        if spec.gates.max_burn_rate is not None:
            self._refuse_unjudged_burn(model)
        if spec.replay is not None and self.replay is None:
            raise FailedPrecondition(
                f"model '{model}': a replay gate replays captured traffic, and this server "
                "captures none: start it with --capture-dir, or start without --replay-since"
            )
        was_loaded = version in self._repo.loaded_versions(model)
        # The pin in effect now, restored if the start is refused: a declared rollout's
        # (autostart pins the serving version before the reload that found the new one),
        # or an ended rollout's winner. Without it Triton's rule would hand a refused
        # candidate, loaded by that reload, all the traffic.
        pinned_before = self._repo.pinned_default(model)
        # Pin first: loading the candidate must not make it "the latest" for anyone.
        self._repo.set_default(model, stable)
        try:
            await self._repo.ensure_loaded(model, version)
        except ConvoyError:
            self._repo.set_default(model, pinned_before)
            raise
        report = None
        if spec.replay is not None:
            report = await self._replay_gate(model, stable, version, spec, pinned_before,
                                             was_loaded)  # fmt: skip
        now = self._clock()
        rollout = Rollout(
            model, stable, version, spec, started_at=now, replay=report,
            objectives=self._objectives_judged(model, spec),
        )  # fmt: skip
        rollout.candidate_was_loaded = was_loaded
        weights = ", ".join(f"v{v} {w:g}%" for v, w in rollout.weights().items())
        reason = f"started {spec.strategy.value} of version {version} over {stable}: {weights}"
        rollout.reason = reason
        try:
            await self._save(rollout)
        except Unavailable:
            await self._undo_start(model, version, pinned_before, was_loaded)
            raise
        self._unsaved.discard(model)
        self._refused.pop(model, None)
        self._apply(rollout, [Transition("started", rollout.phase, reason)])
        if existing is not None and not existing.retired:
            await self._retire_early(existing, keep=(stable, version))
        return self._status(rollout)

    async def _replay_gate(
        self,
        model: str,
        stable: str,
        version: str,
        spec: RolloutSpec,
        pinned_before: str | None,
        was_loaded: bool,
    ) -> dict[str, Any]:
        """Replay captured traffic on the candidate (loaded, no traffic yet) against
        stable; its report, or FailedPrecondition with serving as it was found."""
        assert self.replay is not None and spec.replay is not None
        try:
            report = await self.replay(model, stable, version, spec.replay)
        except BaseException:  # nothing to replay, or the caller went away
            await self._undo_start(model, version, pinned_before, was_loaded)
            raise
        if report.get("passed"):
            return report
        await self._undo_start(model, version, pinned_before, was_loaded)
        reasons = "; ".join(report.get("reasons") or ()) or "the replay did not pass"
        reason = (
            f"replay gate refused version {version} of model '{model}' against version "
            f"{stable}: {reasons}; serving unchanged"
        )
        self._refused = _with(
            self._refused,
            model,
            RolloutStatus(
                model=model,
                strategy=spec.strategy.value,
                phase=REFUSED,
                stable=stable,
                candidate=version,
                weights={stable: 100.0},
                reason=reason,
                analysis="",
                step=0,
                steps=spec.steps,
                shadow_fraction=spec.shadow_fraction,
                windows={},
                replay=report,
            ),
        )
        self.events = _counted(self.events, (model, "replay_refused"))
        log.info("rollout of model '%s': %s", model, reason)
        raise FailedPrecondition(reason)

    async def _undo_start(
        self, model: str, version: str, pinned_before: str | None, was_loaded: bool
    ) -> None:
        """A refused start: serving as it was, without the candidate this call loaded."""
        self._repo.set_default(model, pinned_before)
        if not was_loaded:
            await self._unload(model, version)

    async def promote(self, model: str) -> RolloutStatus:
        async with self._lock(model):
            rollout = self._active(model, "promote").copy()
            transition = rollout.promote(self._clock(), "promoted by the operator")
            await self._commit(rollout, [transition])
            return self._status(rollout)

    async def rollback(self, model: str) -> RolloutStatus:
        """Back to stable: at once while active; after promotion too (instant while the
        old version is kept warm, a reload once it has been retired)."""
        async with self._lock(model):
            rollout = self._get(model)
            if rollout.phase is Phase.ROLLED_BACK:
                raise InvalidInput(f"model '{model}' rollout is already rolled back")
            if rollout.phase is Phase.PROMOTED and rollout.retired:
                await self._repo.ensure_loaded(model, rollout.stable)
            rollout = rollout.copy()
            transition = rollout.rollback(self._clock(), "rolled back by the operator")
            await self._commit(rollout, [transition])
            return self._status(rollout)

    async def pause(self, model: str) -> RolloutStatus:
        async with self._lock(model):
            rollout = self._active(model, "pause").copy()
            if rollout.phase is Phase.PAUSED:
                raise InvalidInput(f"model '{model}' rollout is already paused")
            weights = ", ".join(f"v{v} {w:g}%" for v, w in rollout.weights().items())
            reason = f"paused by the operator at {weights}"
            await self._commit(rollout, [rollout.pause(self._clock(), reason)])
            return self._status(rollout)

    async def resume(self, model: str) -> RolloutStatus:
        async with self._lock(model):
            rollout = self._active(model, "resume").copy()
            if rollout.phase is not Phase.PAUSED:
                raise InvalidInput(f"model '{model}' rollout is not paused")
            await self._commit(rollout, [rollout.resume(self._clock(), "resumed by the operator")])
            return self._status(rollout)

    async def set_weight(self, model: str, percent: float) -> RolloutStatus:
        """A/B only: change the candidate's share; sticky keys move only at the margin."""
        async with self._lock(model):
            rollout = self._active(model, "set the weight of").copy()
            if rollout.spec.strategy is not Strategy.AB:
                raise InvalidInput(
                    f"model '{model}' runs a {rollout.spec.strategy.value} rollout: its weights "
                    "follow its steps; only an ab rollout takes a weight"
                )
            if not 0.0 <= percent <= 100.0:
                raise InvalidInput(f"weight: {percent:g} is out of range 0..100")
            rollout.weight_override = percent
            reason = f"weights set by the operator: candidate {percent:g}%"
            await self._commit(rollout, [Transition("weights_changed", rollout.phase, reason)])
            return self._status(rollout)

    def snapshot(self) -> RolloutSnapshot:
        """For the metrics scrape, from its thread while the loop goes on: each dict and
        rollout read here is one the loop no longer resizes or changes (see the module's
        docstring); a histogram may be read between a bucket's count and its sum."""
        rollouts = self._rollouts
        return RolloutSnapshot(
            rollouts=tuple(
                (model, r.phase.value, r.weights()) for model, r in sorted(rollouts.items())
            ),
            events=dict(self.events),
            shadow_shed=dict(self.shadow_shed),
            divergence={k: (c.cumulative(), c.total) for k, c in self.divergence.items()},
        )

    def status(self, model: str | None = None) -> list[RolloutStatus]:
        """One entry per model with a rollout (active or ended); [] for a model without.
        A start its replay gate refused shows (phase "refused", with the report) until
        a start of the model succeeds: it is the latest word on that model."""
        if model:
            refused = self._refused.get(model)
            if refused is not None:
                return [refused]
            rollout = self._rollouts.get(model)
            if rollout is None:
                self._repo.versions_on_disk(model)  # ModelNotFound for an unknown model
                return []
            return [self._status(rollout)]
        statuses = {m: self._status(r) for m, r in self._rollouts.items()}
        statuses.update(self._refused)
        return [statuses[m] for m in sorted(statuses)]

    def versions_changed(self, model: str) -> None:
        """The repository's change hook: it has just loaded, reloaded or unloaded versions
        of the model. A candidate it dropped (its version directory is gone) rolls back
        here, in the same step: no unversioned request is routed to it afterwards."""
        rollout = self._rollouts.get(model)
        if rollout is None or self._lock(model).locked():
            return  # a control call is loading the arms: the next tick looks instead
        vanished = self._vanished(rollout)
        if vanished is not None:
            changed, transition = vanished
            self._apply(changed, [transition])
            self._unsaved.add(model)  # saved by the next tick, off this synchronous hook

    # -- clock -----------------------------------------------------------------------

    async def tick(self, now: float | None = None) -> None:
        """Advance every rollout's analysis; retire versions whose keep-warm ended.

        Call it every second or so from a task the server owns. Models are
        independent: one whose state cannot be saved, or that fails otherwise,
        is logged and tried again at the next tick; the others go on.
        """
        now = self._clock() if now is None else now
        await asyncio.gather(*(self._tick_one(model, now) for model in list(self._rollouts)))
        for rollout in list(self._rollouts.values()):
            model = rollout.model
            if (
                rollout.finished_at is not None
                and not rollout.retired
                and now - rollout.finished_at >= rollout.spec.keep_warm_s
                and model not in self._retiring
                and not self._lock(model).locked()  # a control call: retire on a later tick
            ):
                # Its own task: a drain lasts up to the grace period, and no other
                # model's analysis may wait for it.
                task = asyncio.get_running_loop().create_task(self._retire_locked(rollout))
                self._retiring[model] = task
                task.add_done_callback(functools.partial(self._retired, model))

    async def close(self) -> None:
        """At shutdown, once tick() is no longer called: stop the retirements under way
        (the repository finishes or abandons their drains within its own grace period)."""
        tasks = list(self._retiring.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _tick_one(self, model: str, now: float) -> None:
        lock = self._lock(model)
        if lock.locked():
            return  # a control call is under way: this model waits for the next tick
        async with lock:
            try:
                # Read under the lock: a control call may have put a new rollout in place.
                await self._advance(self._rollouts[model], now)
            except Exception:
                log.exception("rollout of model '%s': analysis failed", model)

    async def _advance(self, rollout: Rollout, now: float) -> None:
        if rollout.model in self._unsaved:
            await self._save_or_retry(rollout)
        vanished = self._vanished(rollout)
        if vanished is not None:
            changed, transition = vanished
            await self._commit(changed, [transition])
            return
        changed = rollout.copy()
        transitions = changed.tick(now)
        if not transitions:
            return
        try:
            # A failed gate rolls back in this call, before its state is written.
            await self._commit(changed, transitions)
        except Unavailable as exc:
            events = ", ".join(t.event for t in transitions)
            log.error("rollout of model '%s': %s not taken: %s; tried again at the next tick",
                      rollout.model, events, exc.message)  # fmt: skip

    def _vanished(self, rollout: Rollout) -> tuple[Rollout, Transition] | None:
        """An active rollout whose candidate the repository no longer serves, rolled back
        (a copy, to apply). Its share would answer NOT_FOUND, a client error that no gate
        counts: the rollout would never end by itself. A model unloaded whole is left be."""
        loaded = self._repo.loaded_versions(rollout.model)
        if not rollout.phase.active or not loaded or rollout.candidate in loaded:
            return None
        changed = rollout.copy()
        reason = (
            f"candidate version {rollout.candidate} no longer serves: the repository reloaded "
            f"model '{rollout.model}' without it (its version directory is gone); back to "
            f"version {rollout.stable}"
        )
        return changed, changed.rollback(self._clock(), reason)

    async def start_declared(
        self, model: str, version: str, spec: RolloutSpec
    ) -> RolloutStatus | None:
        """A new version appeared in a model that declares a rollout (rollout.json).

        Idempotent, for a repository poll: no-op (None) when the version already
        serves by default, is an older one, was already rolled out (whatever the
        outcome: a rolled-back candidate is not retried), or another rollout runs.
        The check and the start hold the model's lock together: of two polls or loads
        that see the same new version at once, one starts it and the other is a no-op.
        """
        async with self._lock(model):
            existing = self._rollouts.get(model)
            if existing is not None and (existing.phase.active or existing.candidate == version):
                return None
            refused = self._refused.get(model)
            if refused is not None and refused.candidate == version:
                return None  # its replay gate refused it: a poll does not replay it again
            try:
                default = self._repo.default_version(model)
            except ConvoyError:
                default = None  # nothing serves yet: the first version is not a rollout
            if default is None or not _newer(version, default):
                return None
            return await self._start(model, version, spec)

    async def _retire_early(self, rollout: Rollout, keep: tuple[str, ...]) -> None:
        """A new rollout replaces an ended one still keeping its loser warm."""
        rollout.retired = True
        if rollout.loser in keep or (
            rollout.phase is Phase.ROLLED_BACK and rollout.candidate_was_loaded
        ):
            return
        await self._unload(rollout.model, rollout.loser)

    async def _retire_locked(self, rollout: Rollout) -> None:
        async with self._lock(rollout.model):
            if self._rollouts.get(rollout.model) is rollout:  # not replaced meanwhile
                await self._retire(rollout)

    def _retired(self, model: str, task: asyncio.Task[None]) -> None:
        self._retiring.pop(model, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("model '%s': retiring the rollout's loser failed: %r", model, exc)

    async def _retire(self, rollout: Rollout) -> None:
        loser = rollout.loser
        rollout.retired = True  # first: a reload meanwhile no longer keeps the loser
        if rollout.phase is Phase.ROLLED_BACK and rollout.candidate_was_loaded:
            # The repository served it before the rollout: leave it as it was found.
            self._apply(rollout, [])
        else:
            await self._unload(rollout.model, loser)
            reason = f"keep-warm of {rollout.spec.keep_warm_s:g} s over: version {loser} unloaded"
            self._apply(rollout, [Transition("retired", rollout.phase, reason)])
        await self._save_or_retry(rollout)

    async def _unload(self, model: str, version: str) -> None:
        try:
            await self._repo.unload_version(model, version)
        except ConvoyError as exc:
            log.error("model '%s': unloading version %s failed: %s", model, version, exc)

    # -- restart ---------------------------------------------------------------------

    def _refuse_unjudged_burn(self, model: str) -> None:
        """FailedPrecondition unless the model declares an objective the server counts
        per request (availability or latency): quality is counted by Prometheus only, so
        a gate over it alone would never judge."""
        declared = self.objectives.get(model)
        if declared is None:
            raise FailedPrecondition(
                f"model '{model}' declares no SLO (<model>/slo.yaml or the server's "
                "--slo-config): the max_burn_rate gate has no burn rate to judge"
            )
        if all(o.kind is Kind.QUALITY for o in declared.objectives):
            raise FailedPrecondition(
                f"model '{model}' declares only quality objectives, whose burn rate "
                "Prometheus computes, not the server: the max_burn_rate gate needs an "
                "availability or latency objective to judge"
            )

    def _objectives_judged(self, model: str, spec: RolloutSpec) -> tuple[Objective, ...]:
        """The model's SLOs, where a max_burn_rate gate judges them (counting costs a
        little per request: none without the gate)."""
        declared = self.objectives.get(model)
        if spec.gates.max_burn_rate is None or declared is None:
            return ()
        return declared.objectives

    def _judging_burn(self, rollout: Rollout) -> Rollout:
        objectives = self._objectives_judged(rollout.model, rollout.spec)
        if not objectives:
            return rollout
        return dataclasses.replace(rollout, objectives=objectives, windows={})

    async def restore(self) -> None:
        """At start-up, after the repository has loaded: resume every saved rollout.

        An active rollout resumes at its saved step with fresh windows and timers
        (its weight was vetted by the steps before it); if its candidate no longer
        loads it rolls back. An ended one re-pins its winner as the default.
        """
        if self._store is None:
            return
        for record in self._store.load_all():
            try:
                rollout = Rollout.from_record(record, self._clock())
                rollout = self._judging_burn(rollout)
            except (KeyError, ValueError, TypeError) as exc:
                log.error("rollout state for %s is unusable: %r", record.get("model"), exc)
                continue
            async with self._lock(rollout.model):
                await self._restore_one(rollout)

    async def _restore_one(self, rollout: Rollout) -> None:
        model = rollout.model
        self._rollouts = _with(self._rollouts, model, rollout)
        try:
            self._repo.set_default(model, rollout.winner)
            await self._repo.ensure_loaded(model, rollout.winner)
        except ConvoyError as exc:
            log.error("model '%s': version %s does not load after restart: %s",
                      model, rollout.winner, exc.message)  # fmt: skip
        # Serving resumes what the store holds: applied first, the new reason saved after.
        if not rollout.phase.active:
            self._apply(rollout, [])
        else:
            try:
                await self._repo.ensure_loaded(model, rollout.candidate)
            except ConvoyError as exc:
                candidate = rollout.candidate
                reason = f"candidate version {candidate} failed to load after restart: {exc}"
                self._apply(rollout, [rollout.rollback(self._clock(), reason)])
            else:
                weights = ", ".join(f"v{v} {w:g}%" for v, w in rollout.weights().items())
                reason = f"restored after restart: {rollout.phase.value} at {weights}"
                self._apply(rollout, [Transition("restored", rollout.phase, reason)])
        await self._save_or_retry(rollout)

    # -- internals -------------------------------------------------------------------

    def _lock(self, model: str) -> asyncio.Lock:
        lock = self._locks.get(model)
        if lock is None:
            lock = self._locks[model] = asyncio.Lock()
        return lock

    def _get(self, model: str) -> Rollout:
        rollout = self._rollouts.get(model)
        if rollout is None:
            self._repo.versions_on_disk(model)  # ModelNotFound for an unknown model
            raise InvalidInput(f"model '{model}' has no rollout")
        return rollout

    def _active(self, model: str, action: str) -> Rollout:
        rollout = self._get(model)
        if not rollout.phase.active:
            raise InvalidInput(
                f"cannot {action} model '{model}': its rollout has ended ({rollout.phase.value})"
            )
        return rollout

    async def _commit(self, rollout: Rollout, transitions: list[Transition]) -> None:
        """Save, then apply a changed rollout (a copy of the one in place, or a new one).

        Unavailable when the state cannot be saved: nothing is applied, the rollout in
        place stays as it was. A rollback is applied first and its save retried.
        """
        if rollout.phase is Phase.ROLLED_BACK:
            self._apply(rollout, transitions)
            await self._save_or_retry(rollout)
            return
        await self._save(rollout)
        self._unsaved.discard(rollout.model)
        self._apply(rollout, transitions)

    async def _save(self, rollout: Rollout) -> None:
        if self._store is None:
            return
        record = rollout.to_record()  # read on the loop; written and fsynced off it
        try:
            await asyncio.to_thread(self._store.save, record)
        except OSError as exc:
            raise Unavailable(
                f"rollout state of model '{rollout.model}' cannot be saved in "
                f"{self._store.directory} (--rollout-state-dir): {exc}"
            ) from exc

    async def _save_or_retry(self, rollout: Rollout) -> None:
        """For what serving already shows: a failed save is logged and retried each tick."""
        try:
            await self._save(rollout)
        except Unavailable as exc:
            self._unsaved.add(rollout.model)
            log.error("%s; serving has changed already, saving is retried every tick",
                      exc.message)  # fmt: skip
        else:
            self._unsaved.discard(rollout.model)

    def _apply(self, rollout: Rollout, transitions: list[Transition]) -> None:
        """Put the rollout in place; make routing, the repository's default and the
        counters agree with it. Saving is the caller's: _commit or _save_or_retry."""
        model = rollout.model
        self._rollouts = _with(self._rollouts, model, rollout)
        if rollout.phase.active:
            self._routes[model] = rollout.policy()
        else:
            # The pin first: no request may fall back to Triton's "latest" rule in between.
            self._repo.set_default(model, rollout.winner)
            self._routes.pop(model, None)
        for transition in transitions:
            self.events = _counted(self.events, (model, transition.event))
            log.info("rollout of model '%s' version %s: %s (%s): %s", model, rollout.candidate,
                     transition.event, transition.phase.value, transition.reason)  # fmt: skip

    def _status(self, rollout: Rollout) -> RolloutStatus:
        steps = rollout.spec.steps
        stepped = rollout.spec.strategy in (Strategy.CANARY, Strategy.BLUE_GREEN)
        return RolloutStatus(
            model=rollout.model,
            strategy=rollout.spec.strategy.value,
            phase=rollout.phase.value,
            stable=rollout.stable,
            candidate=rollout.candidate,
            weights=rollout.weights(),
            reason=rollout.reason,
            analysis=rollout.analysis,
            step=rollout.step + 1 if stepped else 0,
            steps=steps,
            shadow_fraction=rollout.spec.shadow_fraction,
            windows=rollout.stats(),
            replay=rollout.replay,
        )


def _with(mapping: dict[K, V], key: K, value: V) -> dict[K, V]:
    """`mapping` with key set to value; a new dict if the key is new, so that the
    metrics scrape's thread never iterates a dict that changes size under it."""
    if key in mapping:
        mapping[key] = value
        return mapping
    return {**mapping, key: value}


def _counted(counts: dict[K, int], key: K) -> dict[K, int]:
    return _with(counts, key, counts.get(key, 0) + 1)


def _newer(version: str, than: str) -> bool:
    try:
        return int(version) > int(than)
    except ValueError:
        return version > than
