"""Deciding what runs together and when. Knows nothing of gRPC or runtimes."""
