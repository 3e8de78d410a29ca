"""LitServe with batching, HTTP JSON on PORT at /predict."""

import sys

import litserve as ls
import numpy as np


class Tiny(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return np.asarray(request["data"], dtype=np.float32)[0]

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return x * 2.0 + 1.0

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"data": [output.tolist()]}


def main() -> None:
    port = int(sys.argv[1])
    api = Tiny(max_batch_size=256, batch_timeout=0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    print("READY", flush=True)  # LitServer.run blocks; the harness also polls the port
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


if __name__ == "__main__":
    main()
