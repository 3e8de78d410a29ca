"""InstancePool: a model's instances, each a backend on its own thread.

The pool's capacity (the instance count from config.pbtxt instance_group) is
how many batches of the model run at once. Backends release the GIL while
they compute, so instances run in parallel while the event loop stays free.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from ..backends import Backend
from ..batching.batch import Batch
from ..batching.queue import BatchOutcome

_STOP = None


class ModelInstance:
    """One backend and the thread that owns it.

    A bare thread fed by a SimpleQueue, rather than a ThreadPoolExecutor: the
    hand-off is one queue put and one call_soon_threadsafe, which matters when
    the model itself takes microseconds.
    """

    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self._inbox: queue.SimpleQueue[
            tuple[Batch, asyncio.Future[BatchOutcome], asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def device(self) -> str:
        return self.backend.device

    def submit(self, batch: Batch) -> asyncio.Future[BatchOutcome]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchOutcome] = loop.create_future()
        self._inbox.put((batch, future, loop))
        return future

    def execute(self, batch: Batch) -> BatchOutcome:
        """Gather, run, time. Runs on this instance's thread."""
        start = time.monotonic_ns()
        inputs = batch.gather_inputs()
        gathered = time.monotonic_ns()
        outputs = self.backend.run(inputs, batch.output_names)
        done = time.monotonic_ns()
        return BatchOutcome(
            outputs=outputs,
            input_ns=gathered - start,
            infer_ns=done - gathered,
            device=self.device,
        )

    def _serve(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            batch, future, loop = item
            try:
                outcome = self.execute(batch)
            except BaseException as exc:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_fail, future, exc)
            else:
                loop.call_soon_threadsafe(_succeed, future, outcome)

    def close(self) -> None:
        """Blocking: finish the batch in hand, stop the thread, release the backend."""
        self._inbox.put(_STOP)
        self._thread.join()
        self.backend.close()


def _succeed(future: asyncio.Future[BatchOutcome], outcome: BatchOutcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _fail(future: asyncio.Future[BatchOutcome], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class InstancePool:
    def __init__(self, instances: list[ModelInstance]) -> None:
        if not instances:
            raise ValueError("an InstancePool needs at least one instance")
        self.instances = instances
        self.capacity = len(instances)
        self._free: list[ModelInstance] = list(instances)

    def submit(self, batch: Batch) -> asyncio.Future[BatchOutcome]:
        # The queue never dispatches more batches than `capacity`, so an
        # instance is always free here. The instance is back in the free list
        # before the queue's own done-callback runs (callbacks run in order).
        instance = self._free.pop()
        future = instance.submit(batch)
        future.add_done_callback(lambda _: self._free.append(instance))
        return future

    def close(self) -> None:
        """Blocking: waits for each instance's thread; call it off the event loop."""
        for instance in self.instances:
            instance.close()
