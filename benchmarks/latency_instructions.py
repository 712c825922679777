"""Machine instructions per item in the latency shape: a diagnostic with no target.

The latency benchmark (``bench_stream.py``: 3 x 4 identity ``async def`` stages, the
source paced at 2,000 items/s, outputs read from ``stream()``) moves by a tenth or more
from run to run on a shared machine, more than most changes to the runner move it. This
counts what the noise cannot touch: the machine instructions per item (valgrind's
callgrind: the difference between a run of ``large`` and one of ``small`` items), for
pipeflow and for the hand-written Trio pipeline of the same shape.

Both run under :class:`SkipIdleClock`, a Trio clock on which time stands still while
tasks run and, when every task waits, jumps to the first whole millisecond past the
next deadline (as an epoll wait rounds up): the items come in the groups of the real
benchmark (two or more due together), and a run under callgrind, 50 times slower, does
exactly the same work as one at full speed. Work inside C (builtins, ``bisect``, the
scheduler's epoll call) is counted, unlike ``count_bytecodes.py``'s bytecodes; time
spent waiting in the kernel is not.

    python benchmarks/latency_instructions.py [--small N] [--large N]

Needs valgrind (``apt-get install valgrind``). Fewer instructions are not always less
time (see docs/performance.md): time a change too, with ``bench_stream.py --only
latency --rounds 9``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._common import SkipIdleClock, callgrind_per_item, source_always_waited
from benchmarks.bench_stream import (
    Sink,
    identity,
    make_pipeline,
    paced,
    pipeflow_stream,
    trio_stream,
)
from pipeflow import Pipeline

SIDES = ("pipeflow", "trio")
WORKERS = 4
RATE = 2_000.0
WARM_UP = 50


def run_once(side: str, pipeline: Pipeline[Any, Any], n: int, sink: Sink | None = None) -> int:
    """One ``trio.run`` of ``side`` on a fresh :class:`SkipIdleClock`: ``n`` items paced
    at ``RATE`` through ``pipeline`` (3 x ``WORKERS`` identity stages) or through the
    hand-written Trio pipeline of its shape and buffers, each output handed to ``sink``
    if given; returns the number of outputs."""
    if side == "pipeflow":
        run = functools.partial(pipeflow_stream, pipeline, paced(n, RATE), sink=sink)
    else:
        buffer = pipeline.stages[0].options.buffer_size
        run = functools.partial(
            trio_stream, paced(n, RATE), identity, workers=WORKERS, buffer=buffer, sink=sink
        )
    return trio.run(run, clock=SkipIdleClock())


def run_side(side: str, items: int) -> None:
    """One side in this process: a warm-up run, then ``items`` paced items."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    # On the clock that skips idle time, do what the real clock does at this rate (see
    # source_always_waited()).
    with source_always_waited():
        pipeline = make_pipeline(identity, workers=WORKERS, name="latency_instructions")
        for n in (WARM_UP, items):
            assert run_once(side, pipeline, n) == n


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--side"]:  # a child of callgrind_per_item()
        run_side(args[1], int(args[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1_000)
    opts = parser.parse_args(args)
    if not 0 < opts.small < opts.large:
        parser.error("--small must be above 0 and below --large")
    per_item = callgrind_per_item(
        __file__, "--side", SIDES, opts.small, opts.large, label="latency_instructions.py"
    )
    print(
        f"machine instructions per item, latency shape ({WORKERS} workers x 3 identity "
        f"stages, paced {RATE:,.0f}/s, stream())"
    )
    for side, n in per_item.items():
        print(f"  {side:9} {n:10,.0f}  {n / per_item['trio']:.3f} of Trio's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
