"""Process workers: a CPU-bound pure-Python function as ``@stage(run_in="process")``
with 2 workers vs 1, 200 items of about 20 ms each. Target: >= 1.7x with 2 workers
(on a machine with at least 2 cores).

The function sits at module top level so that it pickles, and the script keeps the
``if __name__ == "__main__":`` guard that worker processes started by spawning need.
Each run starts its own worker processes (so that none outlives the run); that fixed
cost is in the end-to-end figures. The times at which outputs come out give the
steady-state rate as well, without it.

    python benchmarks/bench_process.py [--quick] [--json FILE]
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
import trio_parallel  # type: ignore[import-untyped]

from benchmarks._common import (
    Row,
    bench_main,
    handwritten,
    interleaved,
    median,
    progress,
    rate_row,
    timed,
)
from pipeflow import Pipeline, stage

TARGET = 1.7


def sum_squares(n: int) -> int:
    """Pure-Python CPU work: holds the GIL throughout, so only processes run it in
    parallel."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def calibrate(seconds: float) -> int:
    """The ``n`` for which ``sum_squares(n)`` takes about ``seconds`` here."""
    n = 100_000
    for _ in range(2):  # a probe, then a correction at about the right size
        best = min(timed(functools.partial(sum_squares, n)) for _ in range(3))
        n = max(1, round(n * seconds / best))
    return n


def make_pipeline(workers: int) -> Pipeline[int, int]:
    burn = stage(run_in="process", workers=workers, name="sum_squares")(sum_squares)
    return Pipeline(burn, name=f"process_{workers}")


async def pipeflow_process(pipeline: Pipeline[int, int], source: list[int]) -> list[float]:
    """Run ``pipeline`` over ``source``; the times at which its outputs came out."""
    stamps: list[float] = []
    async with pipeline.stream(source) as outputs:
        async for _ in outputs:
            stamps.append(time.perf_counter())
    return stamps


async def handwritten_process(source: list[int], workers: int) -> list[float]:
    """The same shape by hand: a worker context of its own for the run (so that, as with
    pipeflow, no process outlives it), ``workers`` tasks calling into it; the times at
    which results came back."""
    stamps: list[float] = []
    limiter = trio.CapacityLimiter(workers)
    async with trio_parallel.open_worker_context() as ctx:

        async def call(x: int) -> None:
            await ctx.run_sync(sum_squares, x, limiter=limiter, kill_on_cancel=True)
            stamps.append(time.perf_counter())

        await handwritten(source, call, stages=1, workers=workers, buffer=workers)
    return stamps


def steady_seconds(stamps: list[float], workers: int) -> float:
    """Seconds per ``len(stamps)`` items at the steady rate, start-up excluded.

    With ``w`` workers the first ``w`` results come out together once the processes have
    started; the rate from then on is ``(k - w) / (t[k-1] - t[w-1])``.
    """
    k = len(stamps)
    span = stamps[-1] - stamps[workers - 1]
    return k * span / (k - workers)


def measure(items: int = 200, rounds: int = 5, seconds: float = 0.02) -> list[Row]:
    """Time 2 process workers against 1, and against a hand-written trio-parallel
    pipeline with 2 workers, ``rounds`` times each, interleaved.

    Each run starts its worker processes, a fixed cost included end to end; the times at
    which outputs come out also give the steady-state rate, without it.
    """
    n = calibrate(seconds)
    source = [n] * items
    steady: dict[str, list[float]] = {"two": [], "one": [], "hand": []}

    def case(name: str, workers: int, run: Callable[[], list[float]]) -> Callable[[], None]:
        def go() -> None:
            stamps = run()
            assert len(stamps) == items
            steady[name].append(steady_seconds(stamps, workers))

        return go

    two, one = make_pipeline(2), make_pipeline(1)
    cases = {
        "two": case("two", 2, lambda: trio.run(pipeflow_process, two, source)),
        "one": case("one", 1, lambda: trio.run(pipeflow_process, one, source)),
        "hand": case("hand", 2, lambda: trio.run(handwritten_process, source, 2)),
    }
    progress(f"process: {rounds} rounds x {items} items, 2 vs 1 workers and hand-written")
    times = interleaved(cases, rounds)
    # The per-item time as the worker processes saw it (one worker, steady state).
    item_seconds = median(steady["one"]) / items
    detail = {
        "item_seconds": item_seconds,
        "n": n,
        "rounds": rounds,
        "seconds": times,
        "steady_seconds": steady,
        "startup_seconds": {k: median(times[k]) - median(steady[k]) for k in times},
    }
    label = f"process: 2 workers vs 1, {items} x {item_seconds * 1000:.0f} ms"
    return [
        rate_row(
            "process",
            f"{label}, end to end",
            items,
            times["two"],
            times["one"],
            target=(">=", TARGET),
            baseline_label="1 worker",
            detail=detail,
        ),
        rate_row(
            "process_steady",
            f"{label}, steady state",
            items,
            steady["two"],
            steady["one"],
            target=None,
            baseline_label="1 worker",
            detail=detail,
        ),
        rate_row(
            "process_handwritten",
            f"process: 2 workers vs hand-written, {items} items, end to end",
            items,
            times["two"],
            times["hand"],
            target=None,
            detail=detail,
        ),
    ]


#: Arguments of a short smoke run (``--quick``).
QUICK = {"items": 10, "rounds": 2}


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, measure, QUICK, argv)


if __name__ == "__main__":
    sys.exit(main())
