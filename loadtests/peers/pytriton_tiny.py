"""Real NVIDIA Triton (tritonserver from the nvidia-pytriton wheel), CPU, KServe v2 gRPC on PORT."""

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


@batch
def infer(INPUT0):
    return {"OUTPUT0": INPUT0 * 2.0 + 1.0}


def main() -> None:
    port = int(sys.argv[1])
    config = TritonConfig(grpc_port=port, http_port=port + 1, metrics_port=port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="tiny",
            infer_func=infer,
            inputs=[Tensor(name="INPUT0", dtype=np.float32, shape=(16,))],
            outputs=[Tensor(name="OUTPUT0", dtype=np.float32, shape=(16,))],
            config=ModelConfig(
                max_batch_size=256, batcher=DynamicBatcher(max_queue_delay_microseconds=0)
            ),
        )
        print("READY", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
