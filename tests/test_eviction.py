"""EvictionPolicy with a fake clock and made-up measures; OnDemandLoader over a fake
repository (no models, no server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from convoy.config import ModelControl
from convoy.errors import ConfigError, DeadlineExceeded, ModelNotFound, Overloaded, Unavailable
from convoy.inference.caller import deadline_in
from convoy.metrics import Metrics
from convoy.repository.eviction import EvictionPolicy, Resident
from convoy.repository.memory import growth
from convoy.repository.ondemand import OnDemandLoader

MIB = 1 << 20


def resident(
    name: str, mib: int, used: int, *, busy: bool = False, pinned: bool = False, gpu: int = 0
) -> Resident:
    memory = {"cpu": mib * MIB}
    if gpu:
        memory["cuda:0"] = gpu * MIB
    return Resident(name, memory, used, busy, pinned)


def test_room_is_made_by_the_least_recently_used_models_only_as_needed() -> None:
    policy = EvictionPolicy(100 * MIB, None)
    residents = [resident("a", 30, used=3), resident("b", 30, used=1), resident("c", 30, used=2)]
    assert policy.plan({"cpu": 10 * MIB}, residents).victims == ()
    assert policy.plan({"cpu": 30 * MIB}, residents).victims == ("b",)
    assert policy.plan({"cpu": 60 * MIB}, residents).victims == ("b", "c")


def test_busy_and_pinned_models_are_never_chosen() -> None:
    policy = EvictionPolicy(100 * MIB, None)
    residents = [
        resident("old-busy", 30, used=0, busy=True),
        resident("old-pinned", 30, used=1, pinned=True),
        resident("recent", 30, used=5),
    ]
    assert policy.plan({"cpu": 30 * MIB}, residents).victims == ("recent",)


def test_a_load_that_cannot_fit_evicts_nothing_and_says_why() -> None:
    policy = EvictionPolicy(100 * MIB, None)
    residents = [resident("busy", 50, used=0, busy=True), resident("idle", 30, used=1)]
    plan = policy.plan({"cpu": 60 * MIB}, residents)
    assert plan.victims == ()
    assert plan.shortfall is not None
    assert (plan.shortfall.device, plan.shortfall.budget) == ("cpu", 100 * MIB)
    assert plan.shortfall.need == 60 * MIB
    assert plan.shortfall.kept == 50 * MIB  # what stays after every eviction possible
    assert policy.plan({"cpu": 101 * MIB}, []).shortfall is not None  # larger than all


def test_the_gpu_budget_applies_per_gpu_and_evicts_what_frees_that_gpu() -> None:
    policy = EvictionPolicy(None, 10 * MIB)
    residents = [
        resident("host-only", 500, used=0),  # oldest, but frees nothing on the GPU
        resident("on-gpu", 5, used=1, gpu=8),
    ]
    plan = policy.plan({"cpu": 500 * MIB, "cuda:0": 4 * MIB}, residents)
    assert plan.victims == ("on-gpu",)  # no host budget: host memory is no reason
    assert policy.plan({"cuda:1": 9 * MIB}, residents).victims == ()  # another GPU


def test_idle_models_with_a_fake_clock() -> None:
    now = [10_000_000_000]
    policy = EvictionPolicy(None, None, idle_ns=5_000_000_000, clock=lambda: now[0])
    residents = [
        resident("fresh", 1, used=9_000_000_000),
        resident("idle", 1, used=1_000_000_000),
        resident("idle-busy", 1, used=0, busy=True),
        resident("idle-pinned", 1, used=0, pinned=True),
        resident("older", 1, used=0),
    ]
    assert policy.idle(residents) == ["older", "idle"]
    now[0] = 14_000_000_000
    assert policy.idle(residents) == ["older", "idle", "fresh"]
    assert EvictionPolicy(None, None).idle(residents) == []


def test_growth_counts_only_what_grew() -> None:
    assert growth({"cpu": 100, "cuda:0": 50}, {"cpu": 160, "cuda:0": 40}) == {
        "cpu": 60,
        "cuda:0": 0,
    }


def test_model_control_flags_that_need_on_demand_are_refused_elsewhere() -> None:
    ModelControl(mode="on-demand", memory_budget_bytes=MIB, load_models=("a",)).check()
    ModelControl(mode="explicit", load_models=("a",)).check()
    with pytest.raises(ConfigError, match="--memory-budget-mib"):
        ModelControl(mode="none", memory_budget_bytes=MIB).check()
    with pytest.raises(ConfigError, match="--evict-idle-secs"):
        ModelControl(mode="explicit", evict_idle_s=3.0).check()
    with pytest.raises(ConfigError, match="--load-model"):
        ModelControl(mode="poll", load_models=("a",)).check()


# -- the loader over a fake repository ----------------------------------------------


class FakeMemory:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


class FakeRepository:
    """What OnDemandLoader reads and calls: loads take a gate the test opens."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.loaded: dict[str, int] = {}
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.memory = FakeMemory()
        self.absent_reason = "unloaded"
        self.ensembles: set[str] = set()
        self.root = Path("/models")  # a test with files to change sets its own

    def is_loaded(self, name: str) -> bool:
        return name in self.loaded

    def model_dir(self, name: str) -> Path:
        if name not in self.sizes:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        return self.root / name

    def estimate(self, name: str) -> dict[str, int]:
        return {"cpu": self.sizes[name]}

    async def load(self, name: str, reason: str = "explicit") -> None:
        self.loads.append(name)
        await self.gate.wait()
        if name in self.fail:
            raise self.fail[name]
        self.loaded[name] = self.sizes[name]

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        self.unloads.append(name)
        self.loaded.pop(name, None)

    def memory_held(self, name: str) -> dict[str, int]:
        return {"cpu": self.loaded[name]} if name in self.loaded else {}

    def loaded_names(self) -> list[str]:
        return list(self.loaded)

    def model_busy(self, name: str) -> bool:
        return False

    def is_loaded_ensemble(self, name: str) -> bool:
        return name in self.loaded and name in self.ensembles


def loader_over(
    repo: FakeRepository, budget: int | None = None, pinned: tuple[str, ...] = ()
) -> tuple[OnDemandLoader, list[int]]:
    now = [0]
    loader = OnDemandLoader(
        repo,  # type: ignore[arg-type]
        EvictionPolicy(budget, None, clock=lambda: now[0]),
        Metrics(),
        load_wait_s=5.0,
        pinned=lambda name: name in pinned,
        settle=lambda: None,
        clock=lambda: now[0],
    )
    return loader, now


async def use(loader: OnDemandLoader, name: str, wait_s: float | None = None) -> str:
    async with loader.held(name, deadline_in(wait_s)):
        return name


def test_concurrent_requests_share_one_load_and_its_failure() -> None:
    async def scenario() -> None:
        repo = FakeRepository({"a": MIB})
        loader, _ = loader_over(repo)
        assert repo.absent_reason == "not loaded"
        repo.gate.clear()
        repo.fail["a"] = Overloaded("disk on fire")
        waiters = [asyncio.create_task(use(loader, "a")) for _ in range(5)]
        await asyncio.sleep(0.01)
        repo.gate.set()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        assert [str(o) for o in outcomes] == ["disk on fire"] * 5
        assert repo.loads == ["a"]  # one load for five waiters
        await asyncio.sleep(0.01)
        assert repo.loads == ["a"]  # and no retry until asked
        del repo.fail["a"]
        assert await asyncio.gather(*(use(loader, "a") for _ in range(3))) == ["a"] * 3
        assert repo.loads == ["a", "a"]
        with pytest.raises(ModelNotFound):
            await use(loader, "missing")

    asyncio.run(scenario())


def test_a_waiter_leaves_at_its_deadline_and_the_load_goes_on() -> None:
    async def scenario() -> None:
        repo = FakeRepository({"a": MIB})
        loader, _ = loader_over(repo)
        repo.gate.clear()
        with pytest.raises(DeadlineExceeded, match="did not load in time"):
            await use(loader, "a", wait_s=0.01)
        repo.gate.set()
        assert await use(loader, "a") == "a"
        assert repo.loads == ["a"]

    asyncio.run(scenario())


def test_the_loader_evicts_idle_models_then_drains_busy_ones_and_refuses_what_never_fits() -> None:
    async def scenario() -> None:
        sizes = {"a": 40 * MIB, "b": 40 * MIB, "c": 40 * MIB, "p": 10 * MIB, "huge": 95 * MIB}
        repo = FakeRepository(sizes)
        loader, now = loader_over(repo, budget=100 * MIB, pinned=("p",))
        await use(loader, "p")
        now[0] = 1
        await use(loader, "a")
        now[0] = 2
        async with loader.held("b", None):
            now[0] = 3
            async with loader.held("c", None):  # a, idle, makes way
                assert repo.unloads == ["a"]
                now[0] = 4
                # No idle model left: b (held, the least recently used) is drained first;
                # this caller's deadline passes meanwhile, the load goes on.
                with pytest.raises(DeadlineExceeded, match="did not load in time"):
                    await use(loader, "a", wait_s=0.05)
                assert repo.unloads == ["a"]  # b still answers its request
                with pytest.raises(Overloaded, match="--memory-budget-mib 100"):
                    await use(loader, "huge")  # 95 + 10 pinned can never fit
            now[0] = 5
        assert await use(loader, "a") == "a"  # b's request answered: b went, a came
        assert repo.unloads == ["a", "b"]
        assert repo.memory.released == 2

    asyncio.run(scenario())


def test_busy_models_are_chosen_only_when_asked_and_after_idle_ones() -> None:
    policy = EvictionPolicy(100 * MIB, None)
    residents = [
        resident("busy-old", 40, used=0, busy=True),
        resident("idle-new", 40, used=9),
        resident("busy-new", 10, used=5, busy=True),
    ]
    assert policy.plan({"cpu": 90 * MIB}, residents).shortfall is not None
    plan = policy.plan({"cpu": 90 * MIB}, residents, include_busy=True)
    assert plan.victims == ("idle-new", "busy-old")


def test_stopping_answers_the_waiting_requests_unavailable() -> None:
    async def scenario() -> None:
        repo = FakeRepository({"a": MIB})
        loader, _ = loader_over(repo)
        repo.gate.clear()
        waiter = asyncio.create_task(use(loader, "a"))
        await asyncio.sleep(0.01)
        await loader.stop()
        with pytest.raises(Unavailable, match="stopping"):
            await waiter

    asyncio.run(scenario())


def test_the_server_pins_load_model_names_and_models_under_a_rollout(tmp_path: Path) -> None:
    from convoy.app import ConvoyServer
    from convoy.config import ServerConfig

    control = ModelControl(mode="on-demand", load_models=("named",))
    server = ConvoyServer(ServerConfig(model_control=control), tmp_path)
    assert server.path.on_demand is server.on_demand is not None
    server.rollouts.versions_in_use = lambda name: {"1", "2"} if name == "rolling" else set()  # type: ignore[method-assign]
    assert server._pinned("named") and server._pinned("rolling")
    assert not server._pinned("other")
    plain = ConvoyServer(ServerConfig(), tmp_path)
    assert plain.path.on_demand is None and plain.on_demand is None


def test_an_ensemble_is_never_chosen_to_make_room() -> None:
    async def scenario() -> None:
        # The ensemble's made-up 50 MiB stands for RSS noise measured at its load.
        repo = FakeRepository({"ens": 50 * MIB, "a": 40 * MIB, "b": 70 * MIB})
        repo.ensembles.add("ens")
        loader, now = loader_over(repo, budget=100 * MIB)
        await use(loader, "ens")  # the least recently used from here on
        now[0] = 1
        await use(loader, "a")
        now[0] = 2
        async with loader.held("ens", None):  # its request waits in a step, say
            assert await use(loader, "b") == "b"
        assert repo.unloads == ["a"]  # a went; the ensemble, busy or not, never does

    asyncio.run(scenario())


def test_an_explicit_load_makes_room_within_the_budget() -> None:
    async def scenario() -> None:
        repo = FakeRepository({"a": 60 * MIB, "b": 60 * MIB})
        loader, now = loader_over(repo, budget=100 * MIB)
        await loader.load("a")
        now[0] = 1
        await loader.load("b", reason="explicit")  # RepositoryModelLoad: a makes way
        assert (repo.loads, repo.unloads) == (["a", "b"], ["a"])
        with pytest.raises(ModelNotFound):
            await loader.load("missing")

    asyncio.run(scenario())


def test_on_demand_refuses_the_repository_poll_and_routes_explicit_loads(tmp_path: Path) -> None:
    from convoy.app import ConvoyServer
    from convoy.config import ServerConfig

    control = ModelControl(mode="on-demand")
    with pytest.raises(ConfigError, match="--repository-poll-secs"):
        ConvoyServer(ServerConfig(model_control=control, repository_poll_s=5.0), tmp_path)
    ModelControl(mode="none").check(repository_poll_s=5.0)  # Triton's poll, as before
    server = ConvoyServer(ServerConfig(model_control=control), tmp_path)
    assert server.on_demand is not None
    assert server.declared._load == server.on_demand.load  # RepositoryModelLoad, --load-model


def test_a_broken_model_evicts_healthy_ones_only_when_its_files_change(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = FakeRepository({"good": 60 * MIB, "bad": 60 * MIB})
        repo.root = tmp_path
        (tmp_path / "bad").mkdir()
        loader, now = loader_over(repo, budget=100 * MIB)
        await use(loader, "good")
        repo.fail["bad"] = Unavailable("bad model file")
        now[0] = 1
        with pytest.raises(Unavailable, match="bad model file"):
            await use(loader, "bad")  # its first try makes room: good goes
        now[0] = 2
        await use(loader, "good")
        assert (repo.loads, repo.unloads) == (["good", "bad", "good"], ["good"])
        # The same files again: nothing is evicted for them, the error comes at once.
        with pytest.raises(Unavailable, match="bad model file"):
            await use(loader, "bad")
        assert (repo.loads, repo.unloads) == (["good", "bad", "good"], ["good"])
        # Its files changed: a fresh try, room made.
        (tmp_path / "bad" / "config.pbtxt").write_text("fixed?")
        with pytest.raises(Unavailable, match="bad model file"):
            await use(loader, "bad")
        assert repo.unloads == ["good", "good"]
        # Still the files that failed, but it fits as things are: tried on this request.
        del repo.fail["bad"]
        assert await use(loader, "bad") == "bad"
        assert repo.loads == ["good", "bad", "good", "bad", "bad"]

    asyncio.run(scenario())


def test_evictions_are_collected_once_before_the_next_load_and_never_per_idle_pass() -> None:
    async def scenario() -> None:
        repo = FakeRepository({"a": 60 * MIB, "b": 60 * MIB})
        now = [0]
        settles: list[int] = []
        loader = OnDemandLoader(
            repo,  # type: ignore[arg-type]
            EvictionPolicy(100 * MIB, None, idle_ns=10, clock=lambda: now[0]),
            Metrics(),
            load_wait_s=5.0,
            pinned=lambda name: False,
            settle=lambda: settles.append(now[0]),
            clock=lambda: now[0],
        )
        await use(loader, "a")
        assert settles == []  # nothing evicted: nothing to collect
        now[0] = 1
        await use(loader, "b")  # a makes way: collected once, before b's load
        assert (repo.unloads, settles) == (["a"], [1])
        now[0] = 100
        await loader.evict_idle()
        assert (repo.unloads, settles) == (["a", "b"], [1])  # the idle pass collects not
        now[0] = 101
        await use(loader, "a")  # its load measures after b's garbage is collected
        assert settles == [1, 101]

    asyncio.run(scenario())


def test_a_loads_memory_is_sampled_off_the_event_loop(tmp_path: Path) -> None:
    import threading

    from convoy.repository.manager import ModelRepository
    from tests.linear import linear_source, write_linear_model

    class Probe:
        """Records the thread of every read (a GPU probe's may initialise CUDA)."""

        def __init__(self) -> None:
            self.threads: list[threading.Thread] = []

        def used(self) -> dict[str, int]:
            self.threads.append(threading.current_thread())
            return {"cpu": 0}

        def release(self) -> None:
            pass

    write_linear_model(tmp_path, "m", {1: linear_source(2.0)})
    probe = Probe()

    async def scenario() -> None:
        repository = ModelRepository(tmp_path, Metrics(), memory=probe)
        try:
            await repository.load("m")
        finally:
            await repository.close()

    asyncio.run(scenario())
    assert len(probe.threads) >= 3  # before, the sampler's first and last, after
    assert threading.main_thread() not in probe.threads


def test_an_ensemble_is_measured_as_holding_no_memory(tmp_path: Path) -> None:
    from convoy.repository.manager import ModelRepository
    from tests.linear import linear_source, write_linear_model

    class Growing:
        """Resident memory 50 MiB more at every read: noise a load would measure."""

        def __init__(self) -> None:
            self.reads = 0

        def used(self) -> dict[str, int]:
            self.reads += 1
            return {"cpu": self.reads * 50 * MIB}

        def release(self) -> None:
            pass

    write_linear_model(tmp_path, "lin", {1: linear_source(2.0)}, max_batch_size=1)
    (tmp_path / "ens" / "1").mkdir(parents=True)
    (tmp_path / "ens" / "config.pbtxt").write_text(
        'name: "ens"\nplatform: "ensemble"\nmax_batch_size: 1\n'
        'input [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "lin" model_version: -1\n'
        '  input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } } ] }\n'
    )

    async def scenario() -> None:
        repository = ModelRepository(tmp_path, Metrics(), memory=Growing())
        try:
            await repository.load("lin")
            await repository.load("ens")
            assert repository.is_loaded_ensemble("ens")
            assert not repository.is_loaded_ensemble("lin")
            assert not any(repository.memory_held("ens").values())
            assert not any(repository.estimate("ens").values())
            assert any(repository.memory_held("lin").values())  # the noise, counted
        finally:
            await repository.close()

    asyncio.run(scenario())
