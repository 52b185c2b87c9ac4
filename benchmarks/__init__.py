"""The performance lab: benchmarks by question, probes and experimental formulations.

Not part of the library. Run from the repository root as ``python -m benchmarks.<module>``
(``make bench``; ``benchmarks/gpu_bench.sh`` on an accelerator).
"""
