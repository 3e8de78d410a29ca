"""Per-request cost of the engine's codec for the built-in examples, in-process.

    python -m loadtests.codec_cost [--requests 50000] [--models tiny,image_classifier]

Each step a ModelInfer takes on the event loop outside the batcher, timed alone over
the same request: parse (ModelInferRequest.FromString), decode (validation and the
numpy views: `decode_request`), encode (`encode_response`) and serialize; the fastest
of ten rounds. No server, no threads: the figures move with the code, much less with
what else the machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import numpy as np

from convoy.batching.request import InferResult
from convoy.config import ModelSpec, read_model_config, validate_model_config
from convoy.inference.codec import decode_request, encode_response
from convoy.pb import grpc_service_pb2 as pb
from convoy.repository.examples import default_examples_dir, ensure_examples
from convoy.tensors import numpy_dtype


def _spec(name: str) -> ModelSpec:
    directory = ensure_examples(default_examples_dir()) / name
    return validate_model_config(read_model_config(directory), str(directory), name)


def _request(spec: ModelSpec) -> pb.ModelInferRequest:
    """One row of every input, zeros, as raw_input_contents."""
    request = pb.ModelInferRequest(model_name=spec.name, id="1")
    for tensor in spec.inputs:
        shape = [1, *(8 if d < 0 else d for d in tensor.dims)]
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        dtype = numpy_dtype(tensor.datatype)
        request.raw_input_contents.append(np.zeros(shape, dtype).tobytes())
    return request


def _per_call_us(step: Callable[[], object], n: int, rounds: int = 10) -> float:
    """The fastest of `rounds` rounds: on a shared machine the minimum is what the
    code costs, the rest is what else ran."""
    best = float("inf")
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            step()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / per_round


async def measure(name: str, n: int) -> dict[str, float]:
    spec = _spec(name)
    if any(t.datatype == "BYTES" for t in spec.inputs):
        raise SystemExit(f"{name}: BYTES inputs are not measured here")
    loop = asyncio.get_running_loop()
    payload = _request(spec).SerializeToString()
    request = pb.ModelInferRequest.FromString(payload)
    asked = decode_request(request, spec, loop, 0, 10.0)
    outputs = {
        t.name: np.zeros((1, *(8 if d < 0 else d for d in t.dims)), numpy_dtype(t.datatype))
        for t in spec.outputs
    }
    result = InferResult(outputs)
    response = encode_response(request, spec, 1, asked, result)
    return {
        "parse": _per_call_us(lambda: pb.ModelInferRequest.FromString(payload), n),
        "decode": _per_call_us(lambda: decode_request(request, spec, loop, 0, 10.0), n),
        "encode": _per_call_us(lambda: encode_response(request, spec, 1, asked, result), n),
        "serialize": _per_call_us(response.SerializeToString, n),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50000, help="calls per step")
    parser.add_argument("--models", default="tiny,image_classifier")
    args = parser.parse_args(argv)
    print("| model | parse µs | decode µs | encode µs | serialize µs |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        figures = asyncio.run(measure(name, args.requests))
        cells = " | ".join(f"{figures[k]:.2f}" for k in ("parse", "decode", "encode", "serialize"))
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
