"""Outside the installed package: the demo model's training, probes, benchmarks and their results (RESULTS.md).

Run from the repository root as modules, e.g. `python -m research.bench.qa_latency`.
"""
