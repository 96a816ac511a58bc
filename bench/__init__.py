"""Benchmark scripts (each run as a file: python bench/NAME.py) and the serving package."""
