"""Where the latency benchmark's time goes, hop by hop: a diagnostic, not a target.

The latency shape of ``bench_stream.py`` (3 x 4 identity ``async def`` stages, the
source paced at 2,000 items/s, outputs read from ``stream()``), run on pipeflow and on
the hand-written Trio pipeline alike, with a stage function that stamps each item as
each stage calls it: the wall time and the number of Trio scheduler rounds (event-loop
passes, counted by an instrument) between the source, each stage and the reader. It
also counts task steps per item and times them by task.

    python benchmarks/latency_hops.py [--items N] [--rounds R]

What it showed (see docs/performance.md): pipeflow hands about a third of its hops on
within the same scheduler round and the rest in one, where hand-written Trio takes
exactly one round per hop; pipeflow runs fewer, longer task steps, so its rounds are
longer, and an item that waits a round waits longer: the p99.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import percentile
from benchmarks.bench_stream import STAGES, make_pipeline, paced, pipeflow_stream, trio_stream

WORKERS = 4
RATE = 2_000.0
HOPS = ("source -> 1", *(f"{i} -> {i + 1}" for i in range(1, STAGES)), f"{STAGES} -> reader")


class Rounds(trio.abc.Instrument):
    """Counts scheduler rounds (one event-loop pass each) and times task steps."""

    def __init__(self) -> None:
        self.rounds = 0
        self.step_started = 0.0
        self.steps: dict[str, list[float]] = collections.defaultdict(list)

    def before_io_wait(self, timeout: float) -> None:
        self.rounds += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.step_started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        # pipeflow's task names end with the stage's name; Trio's with the function's.
        kind = task.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        self.steps[kind].append(time.perf_counter() - self.step_started)


def measure(items: int, side: str) -> dict[str, Any]:
    """One run of ``side`` ("pipeflow" or "trio"): per-hop times and rounds."""
    counter = Rounds()
    stamps: list[list[tuple[float, int]]] = []

    async def source() -> AsyncIterator[list[tuple[float, int]]]:
        async for emitted in paced(items, RATE):
            yield [(emitted, counter.rounds)]

    async def stamp(record: list[tuple[float, int]]) -> list[tuple[float, int]]:
        record.append((time.perf_counter(), counter.rounds))
        return record

    def sink(record: list[tuple[float, int]]) -> None:
        record.append((time.perf_counter(), counter.rounds))
        stamps.append(record)

    if side == "pipeflow":
        pipeline = make_pipeline(stamp, workers=WORKERS, name="hops")
        run = functools.partial(pipeflow_stream, pipeline, source(), sink=sink)
    else:
        run = functools.partial(
            trio_stream, source(), stamp, workers=WORKERS, buffer=WORKERS, sink=sink
        )
    trio.run(run, instruments=[counter])
    hops = []
    for k, name in enumerate(HOPS):
        waits = [r[k + 1][0] - r[k][0] for r in stamps]
        rounds = collections.Counter(r[k + 1][1] - r[k][1] for r in stamps)
        hops.append(
            {
                "hop": name,
                "p50_us": percentile(waits, 50) * 1e6,
                "p90_us": percentile(waits, 90) * 1e6,
                "p99_us": percentile(waits, 99) * 1e6,
                "rounds": dict(sorted(rounds.items())),
            }
        )
    total = [r[-1][0] - r[0][0] for r in stamps]
    steps = sum(len(v) for v in counter.steps.values())
    return {
        "side": side,
        "items": len(stamps),
        "p50_us": percentile(total, 50) * 1e6,
        "p99_us": percentile(total, 99) * 1e6,
        "hops": hops,
        "rounds_per_item": counter.rounds / items,
        "steps_per_item": steps / items,
        "steps": {
            kind: {"per_item": len(v) / items, "p50_us": statistics.median(v) * 1e6}
            for kind, v in counter.steps.items()
            if len(v) >= items / 10
        },
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['side']}: end to end p50 {result['p50_us']:.0f} us, p99 "
        f"{result['p99_us']:.0f} us; {result['rounds_per_item']:.2f} rounds and "
        f"{result['steps_per_item']:.2f} task steps per item"
    ]
    for hop in result["hops"]:
        lines.append(
            f"  {hop['hop']:<12} p50 {hop['p50_us']:4.0f}  p90 {hop['p90_us']:4.0f}  "
            f"p99 {hop['p99_us']:4.0f} us   rounds: {hop['rounds']}"
        )
    for kind, s in sorted(result["steps"].items()):
        lines.append(
            f"  steps of {kind:<16} {s['per_item']:.2f} per item, p50 {s['p50_us']:.1f} us"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=4_000, help="items per run (4,000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args(argv)
    if args.items < 100 or args.rounds < 1:
        parser.error("--items must be at least 100 and --rounds at least 1")
    for _ in range(args.rounds):
        for side in ("pipeflow", "trio"):
            print(report(measure(args.items, side)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
