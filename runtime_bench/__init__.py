"""Latency harness for CPU and mobile backends."""
