"""HTTP/REST against gRPC, and an ensemble against calling its steps one by one.

    python -m loadtests.protocols_bench [--duration 5] [--concurrency 16]

One server, one run: `tiny` and `image_classifier` over gRPC, HTTP with JSON tensors
and HTTP with Triton's binary tensor extension (closed loop, the same inputs); then the
documented pipeline (python-backend pre-processing -> the CNN) as one ensemble call
against the client making the two calls itself, over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from convoy.repository.examples import default_examples_dir, ensure_examples

from .bench import Result, _summarise, run_closed_loop, run_http_closed_loop
from .launch import link_model, start_convoy
from .triton_pipeline import write_pipeline

_DTYPES = {"FP32": np.float32, "UINT8": np.uint8}


def http_bodies(
    model: str, name: str, datatype: str, array: np.ndarray
) -> tuple[bytes, bytes, int]:
    """The same request as KServe v2 JSON, and in the binary extension (body, header length)."""
    tensor = {"name": name, "shape": list(array.shape), "datatype": datatype}
    as_json = json.dumps({"inputs": [{**tensor, "data": array.reshape(-1).tolist()}]}).encode()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": array.nbytes}}],
            "outputs": [{"name": _OUTPUTS[model], "parameters": {"binary_data": True}}],
        }
    ).encode()
    return as_json, header + array.tobytes(), len(header)


_OUTPUTS = {"tiny": "OUTPUT0", "image_classifier": "LOGITS"}
_INPUTS = {
    "tiny": ("INPUT0", "FP32", (1, 16)),
    "image_classifier": ("INPUT", "FP32", (1, 3, 64, 64)),
}


def grpc_payload(model: str, name: str, datatype: str, array: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString()


async def _steps_client(
    url: str, image: np.ndarray, concurrency: int, duration: float
) -> tuple[list[float], int]:
    """The pipeline's two calls made by the client: pre-processing, then the model."""
    first = service_pb2.ModelInferRequest(model_name="preprocess")
    first.inputs.add(name="IMAGE", datatype="UINT8", shape=list(image.shape))
    first.raw_input_contents.append(image.tobytes())
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    pre = await call(first, timeout=60)
                    second = service_pb2.ModelInferRequest(model_name="image_classifier")
                    second.inputs.add(
                        name="INPUT", datatype="FP32", shape=list(pre.outputs[0].shape)
                    )
                    second.raw_input_contents.append(pre.raw_output_contents[0])
                    await call(second, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def run_steps(url: str, image: np.ndarray, concurrency: int, duration: float) -> Result:
    asyncio.run(_steps_client(url, image, concurrency, 1.0))  # warm-up
    start = time.perf_counter()
    latencies, errors = asyncio.run(_steps_client(url, image, concurrency, duration))
    elapsed = time.perf_counter() - start
    return _summarise("steps by client", concurrency, 1, latencies, errors, duration, elapsed, 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    c, d = args.concurrency, args.duration

    examples = ensure_examples(default_examples_dir())
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for model in ("tiny", "image_classifier"):
            link_model(examples / model, repo / model)
        write_pipeline(repo)
        server = start_convoy(repo)
        try:
            rng = np.random.default_rng(0)
            lines: list[str] = []
            for model, (name, datatype, shape) in _INPUTS.items():
                array = rng.random(shape).astype(_DTYPES[datatype])
                payload = grpc_payload(model, name, datatype, array)
                as_json, binary, header = http_bodies(model, name, datatype, array)
                url = f"http://{server.http_url}/v2/models/{model}/infer"
                results = [
                    run_closed_loop(server.url, model, c, d, payload=payload),
                    run_http_closed_loop(url, as_json, f"{model} HTTP JSON", c, d),
                    run_http_closed_loop(
                        url, binary, f"{model} HTTP bin", c, d, header_length=header
                    ),
                ]
                grpc_rps = results[0].throughput_rps
                for result in results:
                    ratio = result.throughput_rps / grpc_rps if grpc_rps else 0.0
                    lines.append(f"{result.line()}  ({ratio:4.2f}x gRPC)")
            image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
            ensemble = run_closed_loop(
                server.url,
                "classify",
                c,
                d,
                payload=grpc_payload("classify", "IMAGE", "UINT8", image),
            )
            steps = run_steps(server.url, image, c, d)
            for result in (ensemble, steps):
                ratio = (
                    result.throughput_rps / ensemble.throughput_rps
                    if ensemble.throughput_rps
                    else 0
                )
                lines.append(f"{result.line()}  ({ratio:4.2f}x ensemble)")
        finally:
            server.stop()
    print(f"closed loop, c={c}, {d:g} s each")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
