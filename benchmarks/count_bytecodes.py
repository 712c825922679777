"""Python bytecodes executed per item, by function: a diagnostic with no target.

On a shared machine the wall clock and even CPU time move by a tenth or more from run
to run; the number of bytecodes the interpreter executes does not. This counts them
with ``sys.settrace`` (opcode events) under Trio's ``MockClock``, on two of
``bench_stream.py``'s shapes, for pipeflow and the hand-written baseline side by side:

- ``latency``: 3 x 4 identity ``async def`` stages, 300 items paced at 1,000/s (each
  item alone in the pipeline), outputs read from ``stream()``. Counted: the bytecodes
  executed between an item leaving the source and reaching the reader (the median over
  the items, after 20 to warm up), and per function over that window. This is the work
  on an item's path at low load, what the latency benchmark's times are made of.
- ``w2``: W2 (3 x 50 workers, each item sleeping 10 ms), and Trio's ceiling (the same
  sleeps in 150 bare tasks). Counted: every bytecode of the run, per item (a run of 500
  items subtracted from a run of 500 + N, so that start and end do not count).

A MockClock reads cost more than the real clock's, so the ``_mock_clock.py`` lines
overstate what clock reads cost in a real run. Work done inside C (builtins, ``bisect``,
``collections.Counter``) is not counted at all: a change that moves work from Python
into builtins looks cheaper here than it is, so time it too (CPU seconds). Tracing
makes a run about 20x slower.

    python benchmarks/count_bytecodes.py [latency|w2] [--top N]
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
import trio.testing

from benchmarks import bench_stream

LATENCY_ITEMS = 300
LATENCY_RATE = 1_000.0  # items/s: one item at a time in the pipeline
WARM_UP = 20
W2_BASE = 500
W2_ITEMS = 2_000


class Counter:
    """A ``sys.settrace`` hook that counts executed bytecodes per function: all of them,
    and those executed while :attr:`window` is open."""

    def __init__(self) -> None:
        self.total = 0
        self.window = False
        self.by_function: collections.Counter[str] = collections.Counter()
        self.in_window = False  # count by function only inside the window

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{Path(code.co_filename).name}:{code.co_firstlineno}:{code.co_name}"

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                self.total += 1
                if self.window or not self.in_window:
                    self.by_function[key] += 1
            return local

        return local

    def run(self, fn: Callable[[], Any]) -> None:
        # Trio runs the tasks of a batch in a random order; a fixed seed makes the
        # count repeat exactly (a private attribute: skipped if it is gone).
        rng = getattr(getattr(trio, "_core", None), "_run", None)
        if rng is not None and hasattr(rng, "_r"):
            rng._r.seed(1)
        sys.settrace(self.trace)
        try:
            trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))
        finally:
            sys.settrace(None)


def count_latency(side: str, items: int = LATENCY_ITEMS) -> dict[str, Any]:
    """Bytecodes on an item's path from the source to the reader, items alone."""
    counter = Counter()
    counter.in_window = True
    spans: list[int] = []

    async def paced() -> AsyncIterator[int]:
        # Each item is the count when it left the source (identity stages keep it).
        start = trio.current_time()
        for i in range(items):
            await trio.sleep_until(start + i / LATENCY_RATE)
            counter.window = True
            yield counter.total

    def sink(emitted: int) -> None:
        spans.append(counter.total - emitted)
        counter.window = False

    if side == "pipeflow":
        pipeline = bench_stream.make_pipeline(bench_stream.identity, workers=4, name="count")
        fn = functools.partial(bench_stream.pipeflow_stream, pipeline, paced(), sink=sink)
    else:
        fn = functools.partial(
            bench_stream.trio_stream, paced(), bench_stream.identity, workers=4, buffer=4, sink=sink
        )
    counter.run(fn)
    return {
        "side": side,
        "items": len(spans),
        "per_item": statistics.median(spans[WARM_UP:]),
        "by_function": {k: v / items for k, v in counter.by_function.items()},
    }


def count_w2(side: str, items: int = W2_ITEMS, base: int = W2_BASE) -> dict[str, Any]:
    """Bytecodes per item of W2 (or of Trio's ceiling: ``side="ceiling"``)."""

    def one_run(n: int) -> Counter:
        if side == "pipeflow":
            pipeline = bench_stream.make_pipeline(bench_stream.trio_io, workers=50, name="count")
            fn = functools.partial(bench_stream.pipeflow_stream, pipeline, range(n))
        elif side == "ceiling":
            fn = functools.partial(bench_stream.trio_sleepers, n, 50 * bench_stream.STAGES)
        else:
            fn = functools.partial(
                bench_stream.trio_stream, range(n), bench_stream.trio_io, workers=50, buffer=50
            )
        counter = Counter()
        counter.run(fn)
        return counter

    small, large = one_run(base), one_run(base + items)
    return {
        "side": side,
        "items": items,
        "per_item": (large.total - small.total) / items,
        "by_function": {
            k: (v - small.by_function.get(k, 0)) / items for k, v in large.by_function.items()
        },
    }


def report(result: dict[str, Any], top: int) -> str:
    lines = [f"{result['side']}: {result['per_item']:,.0f} bytecodes per item"]
    ranked = sorted(result["by_function"].items(), key=lambda kv: -kv[1])[:top]
    lines += [f"  {v:8.1f}  {k}" for k, v in ranked if abs(v) >= 1]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", nargs="?", choices=("latency", "w2"), default="latency")
    parser.add_argument("--top", type=int, default=15, help="functions listed per side")
    args = parser.parse_args(argv)
    if args.shape == "latency":
        results = [count_latency(side) for side in ("pipeflow", "trio")]
    else:
        results = [count_w2(side) for side in ("pipeflow", "trio", "ceiling")]
    for result in results:
        print(report(result, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
