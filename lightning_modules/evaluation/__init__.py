"""Measurements of a finalized model: accuracy, size, MACs, latency."""
