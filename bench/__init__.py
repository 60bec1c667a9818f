"""Benchmarks of occlumfs against its peers, measured side by side in one run.

A program, not a test suite: ``python -m bench [image|sefs] [--quick]`` prints
one table per suite with our numbers, each peer's, and the ratio to the best
peer; docs/performance.md explains the workloads and records a run.
"""
