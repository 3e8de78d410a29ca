"""InstancePool: a model's instances, each a backend on its own thread.

The pool's capacity (the instance count from config.pbtxt instance_group) is
how many batches of the model run at once. Backends release the GIL while
they compute, so instances run in parallel while the event loop stays free.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..backends import Backend
from ..batching.batch import Batch
from ..batching.queue import BatchOutcome


@dataclass
class ModelInstance:
    name: str
    backend: Backend
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)

    @property
    def device(self) -> str:
        return self.backend.device

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

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.backend.close()


class InstancePool:
    def __init__(self, instances: list[ModelInstance]) -> None:
        if not instances:
            raise ValueError("an InstancePool needs at least one instance")
        self.instances = instances
        self.capacity = len(instances)
        self._free: asyncio.Queue[ModelInstance] = asyncio.Queue()
        for instance in instances:
            self._free.put_nowait(instance)

    async def run(self, batch: Batch) -> BatchOutcome:
        instance = await self._free.get()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(instance.executor, instance.execute, batch)
        finally:
            self._free.put_nowait(instance)

    def close(self) -> None:
        """Blocking: waits for each instance's thread; call it off the event loop."""
        for instance in self.instances:
            instance.close()
