"""Benchmarks: vanilla vs recursive vs Mixture-of-Recursions backbones (see harness.py)."""
