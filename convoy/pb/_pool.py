"""Convoy's own protobuf descriptor pool.

tritonclient registers the same `inference.*` symbols in protobuf's default
pool; keeping ours apart lets the server and the stock client live in one
process (tests, embedding) without a duplicate-symbol error.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
