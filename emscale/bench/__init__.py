"""Benchmarks behind ``emscale bench``: each prints its figures and can write them as JSON."""
