"""Finding, loading and versioning models on disk."""
