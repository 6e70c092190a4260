"""Benchmarks: each script runs as ``python -m bench.<name>`` from the repository root."""
