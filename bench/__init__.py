"""Benchmarks of patchpack and their committed results (bench/results).

Run them as modules from the repository root, e.g. `python -m bench.engine`. They import torch
and transformers, so they are not part of the service's import graph.
"""
