"""Load and micro benchmarks (see README.md)."""
