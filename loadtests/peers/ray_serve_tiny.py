"""Ray Serve with @serve.batch, HTTP JSON on PORT at /predict."""

import sys
import time

import numpy as np
from ray import serve
from starlette.requests import Request


@serve.deployment(max_ongoing_requests=512)
class Tiny:
    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0)
    async def run(self, rows: list[np.ndarray]) -> list[list[float]]:
        out = np.stack(rows) * 2.0 + 1.0
        return [row.tolist() for row in out]

    async def __call__(self, request: Request) -> dict[str, object]:
        body = await request.json()
        row = np.asarray(body["data"], dtype=np.float32)[0]
        return {"data": [await self.run(row)]}


def main() -> None:
    port = int(sys.argv[1])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Tiny.bind(), route_prefix="/predict")
    print("READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
