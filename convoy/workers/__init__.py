"""Several front-end processes for one engine (`convoy serve --frontends N`).

The engine (the process that owns the models, the batcher and the GPUs) hands gRPC
to N front-end processes listening on the same port (SO_REUSEPORT): they terminate
the connections, run the access policy and pass each ModelInfer to the engine as its
serialised bytes over ZeroMQ, so batches still form across all callers in the
engine's one queue per model. Every other RPC is proxied to the engine's own gRPC
server on a private Unix socket. docs/architecture.md has the picture.
"""
