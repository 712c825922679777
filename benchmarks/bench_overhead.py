"""Overhead: what pipeflow costs per item over a hand-written Trio pipeline.

3 identity stages x 4 workers (``async def identity(x): return x``), 200,000 ints,
outputs not collected. The work is nothing, so the time is all handoffs: channels,
scheduling and pipeflow's bookkeeping. Target: pipeflow >= 0.8 of hand-written.

    python benchmarks/bench_overhead.py [--quick] [--json FILE]
"""

from __future__ import annotations

import functools
import operator
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._common import (
    Row,
    bench_main,
    handwritten,
    interleaved,
    progress,
    rate_row,
)
from pipeflow import Pipeline, stage

STAGES = 3
WORKERS = 4
TARGET = 0.8


async def identity(x: int) -> int:
    return x


def make_pipeline(stages: int = STAGES, workers: int = WORKERS) -> Pipeline[int, int]:
    """``identity_1 | identity_2 | ...``, each stage with ``workers`` workers and the
    default buffer (one slot per worker)."""
    parts = [stage(workers=workers, name=f"identity_{i + 1}")(identity) for i in range(stages)]
    return Pipeline(functools.reduce(operator.or_, parts), name="overhead")


def measure(n: int = 200_000, rounds: int = 5) -> list[Row]:
    """Time pipeflow and the hand-written pipeline over ``range(n)``, ``rounds`` times
    each, interleaved; one row with the medians and their ratio."""
    pipeline = make_pipeline()
    # pipeflow's default buffer of a stage is its worker count; the baseline uses the same.
    buffer = pipeline.stages[0].options.buffer_size

    def run_pipeflow() -> None:
        result = pipeline.run(range(n), collect=False)
        assert result.stats[f"identity_{STAGES}"].items_out == n

    def run_handwritten() -> None:
        trio.run(
            lambda: handwritten(range(n), identity, stages=STAGES, workers=WORKERS, buffer=buffer)
        )

    # Warm up: first-call costs (imports, code objects, allocator) are not per item.
    small = max(1, n // 20)
    pipeline.run(range(small), collect=False)
    trio.run(
        lambda: handwritten(range(small), identity, stages=STAGES, workers=WORKERS, buffer=buffer)
    )

    progress(f"overhead: {rounds} rounds x {n:,} items, pipeflow and hand-written interleaved")
    times = interleaved({"pipeflow": run_pipeflow, "handwritten": run_handwritten}, rounds)
    return [
        rate_row(
            "overhead",
            f"overhead: {STAGES} stages x {WORKERS} workers, identity, {n:,} items",
            n,
            times["pipeflow"],
            times["handwritten"],
            target=(">=", TARGET),
            detail={"stages": STAGES, "workers": WORKERS, "buffer": buffer, "rounds": rounds},
        )
    ]


#: Arguments of a short smoke run (``--quick``).
QUICK = {"n": 20_000, "rounds": 2}


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, measure, QUICK, argv)


if __name__ == "__main__":
    sys.exit(main())
