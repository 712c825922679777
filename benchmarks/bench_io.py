"""I/O-bound: 3 stages x 50 workers, each item waiting 10 ms (``await trio.sleep(0.01)``).

Little's Law bounds the throughput: 50 workers / 0.01 s = 5,000 items/s per stage, and
the stages overlap, so the pipeline can approach that. This checks that pipeflow's
bookkeeping does not get in the way of concurrency. Targets: pipeflow >= 0.95 of the
hand-written pipeline; the fraction of the bound is reported.

    python benchmarks/bench_io.py [--quick] [--json FILE]
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
    median,
    progress,
    rate_row,
)
from pipeflow import Pipeline, stage

STAGES = 3
WORKERS = 50
LATENCY = 0.01
TARGET = 0.95


async def wait_io(x: int) -> int:
    await trio.sleep(LATENCY)
    return x


def make_pipeline(stages: int = STAGES, workers: int = WORKERS) -> Pipeline[int, int]:
    parts = [stage(workers=workers, name=f"io_{i + 1}")(wait_io) for i in range(stages)]
    return Pipeline(functools.reduce(operator.or_, parts), name="io")


def measure(n: int = 5_000, rounds: int = 5) -> list[Row]:
    """Time pipeflow and the hand-written pipeline over ``range(n)``, interleaved; a row
    against hand-written and one against the Little's Law bound."""
    pipeline = make_pipeline()
    buffer = pipeline.stages[0].options.buffer_size

    def run_pipeflow() -> None:
        result = pipeline.run(range(n), collect=False)
        assert result.stats[f"io_{STAGES}"].items_out == n

    def run_handwritten() -> None:
        trio.run(
            lambda: handwritten(range(n), wait_io, stages=STAGES, workers=WORKERS, buffer=buffer)
        )

    progress(f"io: {rounds} rounds x {n:,} items, pipeflow and hand-written interleaved")
    times = interleaved({"pipeflow": run_pipeflow, "handwritten": run_handwritten}, rounds)
    bound = WORKERS / LATENCY
    vs_hand = rate_row(
        "io",
        f"I/O: {STAGES} stages x {WORKERS} workers, {LATENCY * 1000:g} ms, {n:,} items",
        n,
        times["pipeflow"],
        times["handwritten"],
        target=(">=", TARGET),
        detail={"stages": STAGES, "workers": WORKERS, "latency": LATENCY, "rounds": rounds},
    )
    pf = n / median(times["pipeflow"])
    vs_bound = Row(
        benchmark="io_bound",
        workload=f"I/O: vs Little's Law bound ({WORKERS} / {LATENCY * 1000:g} ms)",
        unit="items/s",
        pipeflow=pf,
        baseline=bound,
        ratio=pf / bound,
        baseline_label="bound",
        detail={
            "bound": bound,
            "handwritten_fraction_of_bound": n / median(times["handwritten"]) / bound,
        },
    )
    return [vs_hand, vs_bound]


#: Arguments of a short smoke run (``--quick``).
QUICK = {"n": 1_000, "rounds": 2}


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, measure, QUICK, argv)


if __name__ == "__main__":
    sys.exit(main())
