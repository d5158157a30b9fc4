"""Benchmarks. Run ``python -m bench`` (all) or ``python -m bench producer``. They print a
table and write their figures as JSON under bench/results/. Benchmarks are not tests."""
