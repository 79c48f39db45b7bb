"""Benchmarks: vanilla vs recursive vs Mixture-of-Recursions backbones. harness.py runs them
(`mormm bench`); models.py is what it times, timing.py how, report.py what it writes; profile.py
breaks one row down by kernel (kinds.py groups the kernels)."""
