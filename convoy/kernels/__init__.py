"""Kernels for the work around the model, each with a numpy reference beside it.

The reference is what runs on the CPU and what the GPU version is tested
against (tests/test_kernels.py; the GPU parity tests run where a GPU is lent).
"""
