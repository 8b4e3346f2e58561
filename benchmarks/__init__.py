"""Benchmarks: measure and print figures, side by side with the peer (not tests)."""
