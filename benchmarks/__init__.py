"""Benchmarks: asv-style suites (``bench_*.py``) and their plain runner
(``python -m benchmarks.run``)."""
