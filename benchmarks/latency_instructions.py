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
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._common import callgrind_per_item
from benchmarks.bench_stream import identity, make_pipeline, paced, pipeflow_stream, trio_stream
from pipeflow._run import run as _run

SIDES = ("pipeflow", "trio")
WORKERS = 4
RATE = 2_000.0
WARM_UP = 50


class SkipIdleClock(trio.abc.Clock):
    """Time stands still while tasks run; when all wait, it jumps to the first whole
    millisecond (from now) at or past the next deadline, and the wait takes no time."""

    def __init__(self) -> None:
        self._now = 0.0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if deadline == math.inf:
            return 86_400.0  # nothing is due: a real wait (for a thread, say)
        if deadline > self._now:
            whole_ms = math.ceil((deadline - self._now) * 1000 - 1e-9) / 1000
            self._now = max(deadline, self._now + whole_ms)
        return 0.0


def run_side(side: str, items: int) -> None:
    """One side in this process: a warm-up run, then ``items`` paced items."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    # On a clock that stands still while tasks run, pipeflow's source task would never see
    # that the source made it wait for an item (run.SOURCE_WAITED, 20 us) except across an
    # idle jump; on the real clock at this rate it does for nearly every item (a round
    # takes longer), and then steps aside to let the worker it woke start first. Do here
    # what the real clock does.
    source_waited = _run.SOURCE_WAITED
    _run.SOURCE_WAITED = -1.0
    try:
        pipeline = make_pipeline(identity, workers=WORKERS, name="latency_instructions")
        buffer = pipeline.stages[0].options.buffer_size
        for n in (WARM_UP, items):
            if side == "pipeflow":
                run = functools.partial(pipeflow_stream, pipeline, paced(n, RATE))
            else:
                run = functools.partial(
                    trio_stream, paced(n, RATE), identity, workers=WORKERS, buffer=buffer
                )
            assert trio.run(run, clock=SkipIdleClock()) == n
    finally:
        _run.SOURCE_WAITED = source_waited


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
