"""kvbench: a benchmarking harness and experiment runner for KV-cache compression methods."""

__version__ = "0.1.0"
