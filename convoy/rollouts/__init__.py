"""Rollouts: which version answers a request (policy), and whether a candidate
version is good enough to take more traffic (analysis). No gRPC in here."""
