"""Deciding where batches run: instances, their threads and devices."""
