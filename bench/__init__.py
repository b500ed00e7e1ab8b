"""Benchmarks: each module exposing `run() -> dict[str, float]`; `python -m bench` runs them."""
