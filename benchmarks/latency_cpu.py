"""Steady-state CPU time per item in the latency shape: a diagnostic with no target.

The latency benchmark (``bench_stream.py --only latency``: 3 x 4 identity ``async def``
stages, the source paced at 2,000 items/s, outputs read from ``stream()``) is too noisy on
a shared machine to rank small changes to the runner: its p50 ratio moves by 0.07 either
way from run to run. ``latency_instructions.py`` counts what the noise cannot touch, but
fewer instructions have not meant less time here (see docs/performance.md). This measures
in between: the CPU time (``time.process_time()``) per item, pipeflow's over hand-written
Trio's, in many short runs of the two sides next to each other.

Every run is a ``trio.run`` of one side on :class:`SkipIdleClock` (idle waits take no
time, so a run costs only its CPU time and items come in the real benchmark's groups),
read between the 200th output and the 200th from the end: start-up and tear-down do not
count. After a warm-up run of each side come ``P`` pairs, the side that goes first
alternating (pipeflow, Trio; Trio, pipeflow; ...), and each pair gives a ratio.

    python benchmarks/latency_cpu.py [--items N] [--pairs P]

How to read it: the median of the pairs' ratios is the figure, and beside it a 95%
interval for that median (order statistics, no assumption about the noise's shape).
Two runs, of two versions of the runner, differ when their intervals do not overlap; a
move inside them is noise. The interquartile range says how much single pairs scatter.
It ranks changes: the latency itself is ``bench_stream.py --only latency``'s to judge.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    interleaved,
    median,
    median_interval,
    percentile,
    progress,
    source_always_waited,
)
from benchmarks.bench_stream import STAGES, identity, make_pipeline
from benchmarks.latency_instructions import RATE, SIDES, WORKERS, run_once
from pipeflow import Pipeline

#: Outputs left out at each end of a run: the tasks starting and the pipeline filling,
#: then draining and closing, are not the steady state being compared.
EDGE = 200


def cpu_per_item(side: str, pipeline: Pipeline[Any, Any], items: int) -> float:
    """CPU microseconds per item of one run of ``side``, from the ``EDGE``-th output to
    the ``EDGE``-th from the end."""
    marks = {EDGE: 0.0, items - EDGE: 0.0}
    count = 0

    def sink(_: Any) -> None:
        nonlocal count
        count += 1
        if count in marks:
            marks[count] = time.process_time()

    assert run_once(side, pipeline, items, sink) == items
    return (marks[items - EDGE] - marks[EDGE]) / (items - 2 * EDGE) * 1e6


def measure(items: int, pairs: int) -> dict[str, Any]:
    """A warm-up run of each side, then ``pairs`` pairs of runs of ``items`` items."""
    if items <= 2 * EDGE or pairs < 1:
        raise ValueError(f"need more than {2 * EDGE} items and at least one pair")
    pipeline = make_pipeline(identity, workers=WORKERS, name="latency_cpu")
    runs = {side: functools.partial(cpu_per_item, side, pipeline, items) for side in SIDES}
    progress(f"latency_cpu.py: {pairs} pairs of {items:,} items")
    # On the clock that skips idle time, do what the real clock does at this rate (see
    # source_always_waited()), or pipeflow's source task would take another path.
    with source_always_waited():
        for warm_up in runs.values():
            warm_up()
        us = interleaved(runs, pairs, measure=lambda run: run())  # each run times itself
    return {
        "items": items,
        "pairs": pairs,
        "us_per_item": us,
        "ratios": [pf / tr for pf, tr in zip(us["pipeflow"], us["trio"], strict=True)],
    }


def report(result: dict[str, Any]) -> str:
    ratios = result["ratios"]
    low, high = percentile(ratios, 25), percentile(ratios, 75)
    m_low, m_high, coverage = median_interval(ratios)
    items = result["items"]
    lines = [
        f"latency shape: {STAGES} x {WORKERS} identity async stages, paced {RATE:,.0f} "
        f"items/s on a clock that skips idle waits, stream(); steady-state CPU per item "
        f"(outputs {EDGE:,} to {items - EDGE:,} of {items:,} per run), {result['pairs']} pairs",
    ]
    for side, values in result["us_per_item"].items():
        lines.append(f"  {side:9} {median(values):6.2f} us per item (median)")
    lines.append(
        f"  pipeflow / trio, pair by pair: median {median(ratios):.3f} "
        f"({coverage:.0%} interval for the median: {m_low:.3f}-{m_high:.3f}), "
        f"interquartile range {low:.3f}-{high:.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2_000, help="items per run (2,000)")
    parser.add_argument("--pairs", type=int, default=30, help="pairs of runs (30)")
    args = parser.parse_args(argv)
    if args.items < 1_000:
        parser.error(f"--items must be at least 1,000 (got {args.items})")
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1 (got {args.pairs})")
    print(report(measure(args.items, args.pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
