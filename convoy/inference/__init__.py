"""The one inference path every door hands its requests to (DESIGN §11): admission,
routing, decode, cache, queue, monitoring, shadow, capture; and what it reads and writes
(the KServe v2 codec, Triton's shared-memory regions). Knows no transport."""
