"""Peer servers for the side-by-side comparison, each serving the same model function
(y = 2x + 1 over FP32 [16], batched). Each runs in its own virtual environment,
created by loadtests/compare.py, and prints READY once it serves. Usage:
python <script> PORT."""
