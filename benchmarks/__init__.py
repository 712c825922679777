"""pipeflow's benchmarks: each one runs pipeflow against a hand-written Trio pipeline of
the same shape, in the same process, and reports the ratio.

Run them all with ``python benchmarks/run.py`` (``--quick`` for a smoke run); see
docs/performance.md for what each measures and the figures on a reference machine.
"""
