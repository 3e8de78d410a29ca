"""InstancePool with injected device faults: GPU-first placement, retry on the CPU,
circuit breaker with back-off and probe. Every batch answered exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from convoy.batching.batch import Batch
from convoy.batching.queue import BatchDone, BatchOutcome
from convoy.errors import Unavailable
from convoy.scheduling.devices import is_device_fault
from convoy.scheduling.health import DeviceHealth
from convoy.scheduling.pool import InstancePool, ModelInstance

from .fakes import make_request


class FakeBackend:
    """y = x + offset; a "GPU" one fails with a CUDA error while `broken` is set."""

    def __init__(self, device: str, offset: float) -> None:
        self.device = device
        self.offset = offset
        self.broken = threading.Event()
        self.calls = 0
        self.closed = 0
        # Recoverable by default: the breaker probes the device again after a back-off.
        self.fault = "CUDA out of memory. Tried to allocate 2.00 GiB"

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.broken.is_set():
            raise RuntimeError(self.fault)
        return {"y": inputs["x"] + self.offset}

    def close(self) -> None:
        self.closed += 1


class GatedBackend(FakeBackend):
    """Holds each batch until the test opens the gate."""

    def __init__(self, device: str, offset: float, gate: threading.Event) -> None:
        super().__init__(device, offset)
        self.gate = gate

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.gate.wait(5)
        return super().run(inputs, output_names)


def batch_of(value: float, loop: asyncio.AbstractEventLoop) -> Batch:
    return Batch(requests=(make_request(value=value, loop=loop),), batched=True)


def submitted(pool: InstancePool, batch: Batch) -> asyncio.Future[BatchOutcome]:
    """The batch's one answer as a future; a second answer would fail the test."""
    future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()

    def done(outcome: BatchOutcome | BaseException) -> None:
        assert not future.done(), "a batch answered twice"
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    pool.submit(batch, done)
    return future


def test_device_fault_classification() -> None:
    assert is_device_fault(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(ValueError("bad input"))


def test_gpu_first_then_cpu_retry_then_probe() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        gpu_backend, cpu_backend = FakeBackend("cuda:0", 100.0), FakeBackend("cpu", 1.0)
        gpu = ModelInstance("gpu", gpu_backend)
        cpu = ModelInstance("cpu", cpu_backend)
        pool = InstancePool([cpu, gpu], backoff_s=0.2, backoff_cap_s=1.0)

        healthy = await submitted(pool, batch_of(1.0, loop))
        assert healthy.outputs["y"][0, 0] == 101.0 and healthy.device == "cuda:0"

        gpu_backend.broken.set()
        retried = await submitted(pool, batch_of(2.0, loop))  # fails on the GPU; the CPU answers
        assert retried.outputs["y"][0, 0] == 3.0 and retried.device == "cpu"
        assert pool.fallbacks == 1 and not pool.breaker(gpu).allows(time.monotonic())

        calls = gpu_backend.calls
        while_open = await submitted(pool, batch_of(3.0, loop))  # breaker open: straight to the CPU
        assert while_open.device == "cpu" and gpu_backend.calls == calls

        gpu_backend.broken.clear()
        await asyncio.sleep(0.3)  # back-off passes: the next batch probes the GPU
        probe = await submitted(pool, batch_of(4.0, loop))
        assert probe.device == "cuda:0" and probe.outputs["y"][0, 0] == 104.0
        assert pool.breaker(gpu).failures == 0
        await asyncio.to_thread(pool.close)

    asyncio.run(body())


def test_no_cpu_instance_answers_unavailable() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        backend = FakeBackend("cuda:0", 0.0)
        backend.broken.set()
        pool = InstancePool([ModelInstance("gpu", backend)], backoff_s=0.05)
        with pytest.raises(Unavailable, match="no CPU instance"):
            await submitted(pool, batch_of(1.0, loop))
        await asyncio.to_thread(pool.close)

    asyncio.run(body())


def test_many_batches_under_faults_each_answered_once() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        gpus = [FakeBackend(f"cuda:{i}", 100.0) for i in range(2)]
        instances = [ModelInstance(f"gpu{i}", b) for i, b in enumerate(gpus)]
        instances.append(ModelInstance("cpu", FakeBackend("cpu", 1.0)))
        pool = InstancePool(instances, backoff_s=0.01, backoff_cap_s=0.05)
        gpus[0].broken.set()
        answers: dict[float, list[float]] = {}
        in_flight: list[asyncio.Future[object]] = []
        for i in range(200):
            if i == 100:
                gpus[1].broken.set()
            if i == 150:
                gpus[0].broken.clear()
            # The queue never has more batches out than the pool's capacity.
            pending = [f for f in in_flight if not f.done()]
            if len(pending) >= pool.capacity:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            future = submitted(pool, batch_of(float(i), loop))
            in_flight.append(future)  # type: ignore[arg-type]
            future.add_done_callback(
                lambda f, i=i: answers.setdefault(float(i), []).append(
                    float(f.result().outputs["y"][0, 0]) - i
                )
            )
        await asyncio.gather(*in_flight)
        assert sorted(answers) == [float(i) for i in range(200)]
        assert all(len(v) == 1 for v in answers.values())  # exactly once
        assert all(v[0] in (1.0, 100.0) for v in answers.values())  # right result, any device
        assert pool.fallbacks > 0
        await asyncio.to_thread(pool.close)

    asyncio.run(body())


def test_cpu_takes_ordinary_batches_only_after_the_spill_bound() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        for spill in (None, 0.05):
            gate = threading.Event()

            gpu = ModelInstance("gpu", GatedBackend("cuda:0", 100.0, gate))
            cpu = ModelInstance("cpu", FakeBackend("cpu", 1.0))
            pool = InstancePool([gpu, cpu], cpu_spill_after_s=spill)
            first = submitted(pool, batch_of(1.0, loop))  # occupies the GPU
            second = submitted(pool, batch_of(2.0, loop))  # GPU busy, CPU free
            await asyncio.sleep(0.2)
            if spill is None:
                assert not second.done()  # waits for the GPU: CPU is the fallback only
            else:
                assert second.done() and second.result().device == "cpu" and pool.spills == 1
            gate.set()
            await asyncio.gather(first, second)
            assert first.result().device == "cuda:0"
            await asyncio.to_thread(pool.close)

    asyncio.run(body())


class RankingGpuBackend(FakeBackend):
    """A "GPU" backend that ranks on its device, and fails there with a CUDA error."""

    def run_ranked(self, inputs, output_names, rankings):  # type: ignore[no-untyped-def]
        from convoy.kernels.classify import topk_reference
        from convoy.tensors import Ranked

        outputs = self.run(inputs, ("y",))
        ranked = {
            name: Ranked(*topk_reference(outputs[name], ask.k, ask.softmax))
            for name, ask in rankings.items()
        }
        return {n: outputs[n] for n in output_names}, ranked


def test_a_classification_batch_that_fails_on_the_gpu_is_ranked_on_the_cpu() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        gpu_backend = RankingGpuBackend("cuda:0", 100.0)
        gpu_backend.broken.set()  # its run_ranked raises a CUDA error
        pool = InstancePool(
            [ModelInstance("gpu", gpu_backend), ModelInstance("cpu", FakeBackend("cpu", 1.0))],
            backoff_s=5.0,
        )
        request = make_request(rows=2, shape=(4,), value=0.0, loop=loop)
        request.inputs["x"] = np.array([[0, 3, 1, 2], [5, 4, 7, 6]], np.float32)
        request.classification["y"] = 2
        batch = Batch(requests=(request,), batched=True)
        outcome = await submitted(pool, batch)
        assert outcome.device == "cpu" and pool.fallbacks == 1 and gpu_backend.calls == 1
        (result,) = batch.split_outputs(outcome.outputs, outcome.ranked)
        assert result.outputs == {}  # only the ranking was asked for
        assert result.ranked["y"].indices.tolist() == [[1, 3], [2, 3]]
        np.testing.assert_allclose(result.ranked["y"].values, [[4.0, 3.0], [8.0, 7.0]])
        await asyncio.to_thread(pool.close)

    asyncio.run(body())


def test_capacity_counts_only_instances_that_take_ordinary_batches() -> None:
    """Issue 10 item 9: a CPU fallback instance does not let the queue send a second
    batch early to wait inside the pool, unseen by deadlines and the SLO controller."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        gpu_backend = FakeBackend("cuda:0", 100.0)
        gpu, cpu = ModelInstance("gpu", gpu_backend), ModelInstance("cpu", FakeBackend("cpu", 1))
        pool = InstancePool([gpu, cpu], backoff_s=5.0)
        assert pool.capacity == 1  # the GPU only: the CPU instance is its fallback
        gpu_backend.broken.set()
        assert (await submitted(pool, batch_of(1.0, loop))).device == "cpu"
        assert pool.capacity == 1  # the GPU is out of service: now the CPU serves
        spilling = InstancePool(
            [
                ModelInstance("g", FakeBackend("cuda:1", 0)),
                ModelInstance("c", FakeBackend("cpu", 0)),
            ],
            cpu_spill_after_s=0.05,
        )
        assert spilling.capacity == 2  # a spill bound makes the CPU take ordinary batches
        cpu_only = InstancePool([ModelInstance(f"c{i}", FakeBackend("cpu", 0)) for i in range(3)])
        assert cpu_only.capacity == 3
        for p in (pool, spilling, cpu_only):
            await asyncio.to_thread(p.close)

    asyncio.run(body())


def test_fatal_device_fault_fails_the_device_for_good() -> None:
    """Issue 10 item 11: an illegal address poisons the CUDA context: no more probes,
    every model's instances on that device stop, and a GPU-only model is lost."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        health = DeviceHealth()
        gpu_backend = FakeBackend("cuda:0", 100.0)
        gpu_backend.fault = "CUDA error: an illegal memory access was encountered"
        gpu_backend.broken.set()
        mixed = InstancePool(
            [ModelInstance("gpu", gpu_backend), ModelInstance("cpu", FakeBackend("cpu", 1.0))],
            backoff_s=0.01,
            health=health,
        )
        other_backend = FakeBackend("cuda:0", 5.0)
        other = InstancePool([ModelInstance("other", other_backend)], health=health)
        lost: list[str] = []
        other.on_lost = lambda error: lost.append(error.message)

        assert (await submitted(mixed, batch_of(1.0, loop))).device == "cpu"
        assert health.is_failed("cuda:0") and "illegal memory access" in health.failed["cuda:0"]
        gpu_backend.broken.clear()
        await asyncio.sleep(0.05)  # long past the back-off: still no probe
        assert (await submitted(mixed, batch_of(2.0, loop))).device == "cpu"
        assert gpu_backend.calls == 1 and mixed.capacity == 1

        # The other model has only instances on the failed device: lost, refused at once.
        assert lost and "cuda:0" in lost[0] and other.capacity == 0
        with pytest.raises(Unavailable, match="devices failed"):
            await submitted(other, batch_of(3.0, loop))
        assert other_backend.calls == 0
        for p in (mixed, other):
            await asyncio.to_thread(p.close)

    asyncio.run(body())


def test_a_retired_instance_closes_its_backend_when_its_call_returns() -> None:
    """Issue 10 item 11: a timed-out instance must not keep its memory for ever."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        stuck = GatedBackend("cpu", 0.0, gate)
        pool = InstancePool([ModelInstance("stuck", stuck)], execution_timeout_s=0.05)
        with pytest.raises(Unavailable, match="execution timeout"):
            await submitted(pool, batch_of(1.0, loop))
        assert stuck.closed == 0  # still inside its call
        gate.set()
        for _ in range(100):
            if stuck.closed:
                break
            await asyncio.sleep(0.01)
        assert stuck.closed == 1

    asyncio.run(body())


def test_last_instance_gone_and_no_replacement_fails_at_once() -> None:
    """Issue 10 item 6: the last instance retires and its replacement fails to
    build: the model is lost, and later batches are answered at once, not never."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        gate = threading.Event()

        def broken_factory(device: str) -> ModelInstance:
            raise RuntimeError("cannot build a replacement")

        pool = InstancePool(
            [ModelInstance("stuck", GatedBackend("cpu", 0.0, gate))],
            broken_factory,
            execution_timeout_s=0.05,
        )
        lost: list[str] = []
        pool.on_lost = lambda error: lost.append(error.message)
        with pytest.raises(Unavailable, match="execution timeout"):
            await submitted(pool, batch_of(1.0, loop))
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.01)
        assert lost and "no instance" in lost[0]
        with pytest.raises(Unavailable, match="no instance"):
            await asyncio.wait_for(submitted(pool, batch_of(2.0, loop)), 1)
        gate.set()
        await asyncio.to_thread(pool.close)

    asyncio.run(body())


class _StopBackend(FakeBackend):
    """A backend bug: StopIteration (which an asyncio future refuses) escapes run()."""

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        if self.calls == 0:
            self.calls += 1
            return next(iter(()))
        return super().run(inputs, output_names)


def test_a_backend_raising_stopiteration_still_answers_its_batch_and_frees_the_instance() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = InstancePool([ModelInstance("cpu", _StopBackend("cpu", 1.0))])
        try:
            first = submitted(pool, Batch(requests=(make_request(loop=loop),), batched=True))
            with pytest.raises(RuntimeError, match="StopIteration"):
                await asyncio.wait_for(first, 5.0)
            second = submitted(pool, Batch(requests=(make_request(loop=loop),), batched=True))
            await asyncio.wait_for(second, 5.0)  # the instance is free again
        finally:
            await asyncio.to_thread(pool.close, 1.0)

    asyncio.run(scenario())


def test_a_batch_waiting_when_the_pool_closes_is_answered_not_handed_to_a_stopped_thread() -> None:
    """close() stops the instance threads; a batch still waiting for an instance (a
    drain that timed out) gets UNAVAILABLE once the running batch returns, instead of
    being queued behind the thread's stop and never answered."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        backend = GatedBackend("cpu", 1.0, gate)
        pool = InstancePool([ModelInstance("only", backend)])
        running = submitted(pool, batch_of(1.0, loop))
        waiting = submitted(pool, batch_of(2.0, loop))
        await asyncio.sleep(0.05)
        closing = loop.run_in_executor(None, pool.close, 5.0)
        await asyncio.sleep(0.05)
        gate.set()
        await closing
        outcome = await asyncio.wait_for(running, 2)
        assert outcome.outputs["y"][0, 0] == 2.0
        with pytest.raises(Unavailable):
            await asyncio.wait_for(waiting, 2)
        assert backend.calls == 1

    asyncio.run(body())


def test_a_refused_batch_is_answered_in_a_later_turn_not_inside_submit() -> None:
    """The queue's callback may form and submit the next batch: it must never run
    while the queue is still inside submit (a lost or closed pool answers at once)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        pool = InstancePool([ModelInstance("only", FakeBackend("cpu", 1.0))])
        await asyncio.to_thread(pool.close, 1.0)
        answers: list[BatchOutcome | BaseException] = []
        pool.submit(batch_of(1.0, loop), answers.append)
        assert answers == []
        await asyncio.sleep(0)
        assert len(answers) == 1 and isinstance(answers[0], Unavailable)

    asyncio.run(body())


def _raising(answers: list[BatchOutcome | BaseException]) -> BatchDone:
    """A queue callback with a bug: records its answer, then raises."""

    def done(outcome: BatchOutcome | BaseException) -> None:
        answers.append(outcome)
        raise RuntimeError("a bug in the queue's callback")

    return done


def test_a_raising_callback_does_not_stop_the_pool_answering_the_batches_after_it() -> None:
    """The pool calls the queue's callback in the middle of its bookkeeping: one that
    raises must not leave the other waiting batches unanswered."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        pool = InstancePool([ModelInstance("only", GatedBackend("cpu", 1.0, gate))])
        running = submitted(pool, batch_of(1.0, loop))
        raised: list[BatchOutcome | BaseException] = []
        pool.submit(batch_of(2.0, loop), _raising(raised))
        last = submitted(pool, batch_of(3.0, loop))
        await asyncio.sleep(0.05)
        closing = loop.run_in_executor(None, pool.close, 5.0)
        await asyncio.sleep(0.05)
        gate.set()
        await closing
        assert (await asyncio.wait_for(running, 2)).outputs["y"][0, 0] == 2.0
        with pytest.raises(Unavailable):
            await asyncio.wait_for(last, 2)
        assert len(raised) == 1 and isinstance(raised[0], Unavailable)

    asyncio.run(body())


def test_a_raising_callback_on_a_timed_out_batch_still_gets_the_instance_replaced() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        built: list[str] = []

        def factory(device: str) -> ModelInstance:
            built.append(device)
            return ModelInstance("replacement", FakeBackend(device, 5.0))

        pool = InstancePool(
            [ModelInstance("stuck", GatedBackend("cpu", 0.0, gate))],
            factory,
            execution_timeout_s=0.05,
        )
        raised: list[BatchOutcome | BaseException] = []
        pool.submit(batch_of(1.0, loop), _raising(raised))
        for _ in range(100):
            if built and pool.capacity == 1:
                break
            await asyncio.sleep(0.01)
        assert built == ["cpu"] and pool.lost is None
        assert len(raised) == 1 and isinstance(raised[0], Unavailable)
        outcome = await asyncio.wait_for(submitted(pool, batch_of(2.0, loop)), 2)
        assert outcome.outputs["y"][0, 0] == 7.0
        gate.set()
        await asyncio.to_thread(pool.close, 1.0)

    asyncio.run(body())
