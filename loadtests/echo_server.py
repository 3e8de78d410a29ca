"""The Python gRPC ceiling: a bare grpc.aio server whose ModelInfer echoes inputs.

    python -m loadtests.echo_server --port 8101

No validation, no queue, no model: the fastest any grpc.aio server on uvloop can
answer ModelInfer here. Convoy's tiny-model throughput is compared against it.
"""

from __future__ import annotations

import argparse

import grpc
from tritonclient.grpc import service_pb2


def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    parsed = service_pb2.ModelInferRequest.FromString(request)
    response = service_pb2.ModelInferResponse(model_name=parsed.model_name, id=parsed.id)
    for tensor in parsed.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.extend(parsed.raw_input_contents)
    return response.SerializeToString()


async def _infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _echo(request, context)


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(_infer)},
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo server on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
