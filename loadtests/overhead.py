"""Scheduling overhead of the batcher alone: a ModelQueue over a no-op runner.

    python -m loadtests.overhead --requests 50000 --concurrency 1,32

Measures, in-process on one event loop, the cost per request of submit ->
batch formation -> dispatch -> split -> answer, without gRPC or a model.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from convoy.batching.batch import Batch
from convoy.batching.queue import BatchDone, BatchOutcome, ModelQueue
from convoy.batching.request import InferRequest
from convoy.config import BatchingConfig
from convoy.errors import ConvoyError


class NoOpRunner:
    capacity = 1

    def __init__(self) -> None:
        self.batches = 0

    def submit(self, batch: Batch, done: BatchDone) -> None:
        """Answers on the next loop iteration, like a real instance's call_soon_threadsafe."""
        self.batches += 1
        inputs = batch.gather_inputs()
        outcome = BatchOutcome(outputs={"y": inputs["x"]}, input_ns=0, infer_ns=0, device="cpu")
        asyncio.get_running_loop().call_soon(done, outcome)


class NullObserver:
    def on_batch(self, batch: Batch, outcome: BatchOutcome, output_ns: int) -> None:
        pass

    def on_request_done(self, request: InferRequest, error: ConvoyError | None, now: int) -> None:
        pass


async def overhead_us(requests: int, concurrency: int, max_batch: int = 64) -> tuple[float, float]:
    """Microseconds per request and the mean batch size."""
    loop = asyncio.get_running_loop()
    runner = NoOpRunner()
    queue = ModelQueue("overhead", max_batch, BatchingConfig(), runner, NullObserver())
    queue.start()
    data = np.zeros((1, 16), np.float32)
    done = 0

    async def client() -> None:
        nonlocal done
        while done < requests:
            done += 1
            request = InferRequest(
                id="", inputs={"x": data}, outputs=("y",), rows=1, shape_key=(("x", (16,)),),
                future=loop.create_future(),
            )  # fmt: skip
            queue.submit(request)
            await request.future

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await queue.close(drain=True)
    return elapsed / requests * 1e6, requests / max(runner.batches, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", default="1,32")
    args = parser.parse_args(argv)
    import uvloop

    for c in (int(x) for x in args.concurrency.split(",")):
        us, batch = uvloop.run(overhead_us(args.requests, c))
        print(f"batcher alone c={c:<4} {us:7.2f} us/request  mean batch {batch:5.2f}")


if __name__ == "__main__":
    main()
