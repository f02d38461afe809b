"""Benchmarks that compare paramserver with a peer in the same run: `python -m bench.run` (see bench/run.py)."""
