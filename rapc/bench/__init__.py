"""Latency and robust-accuracy benchmarks (the `rapc bench` command)."""
