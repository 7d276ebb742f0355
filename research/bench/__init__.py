"""Benchmarks and probes; each prints a table. Figures and logs: RESULTS.md beside them."""
