"""graphopt's benchmarks, studies and zoo sweeps: not part of the installed package.

Run them from the repository root, e.g. ``python -m benchmarks.bench_prune speed``; each writes
JSON and a Markdown table under bench-results/ (see benchmarks/README.md and
benchmarks/harness.py, which they all share). Importing any of them changes nothing in the
process: thread counts and environment variables are set in their ``main()``.
"""
