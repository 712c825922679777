"""Metrics cost: pipeflow with Prometheus metrics on vs off, on the overhead workload.

3 identity stages x 4 workers, 200,000 ints, outputs not collected (the overhead
workload, where handoffs are all the work, so any per-item cost would show). "On" is a
pipeline with ``registry=CollectorRegistry()`` run with ``metrics_port=0`` (the HTTP
endpoint listening for the whole run); "off" is the same chain with neither. Both run in
one process, in alternating rounds. Target: on >= 0.95 of off, on CPU time (a
single-threaded workload: a neighbour's load slows the wall clock, not the CPU seconds
spent), the median of the rounds' own ratios. Also reported (in the JSON detail): the
same ratio from wall-clock time, and the time one scrape of the endpoint's registry
takes.

    python benchmarks/bench_metrics.py [--quick] [--json FILE]
    python benchmarks/bench_metrics.py --instructions

This machine's CPU seconds for one and the same run vary by a third from run to run,
as much as the effect measured. ``--instructions`` settles it with a count the noise
cannot touch: the machine instructions per item on each side (valgrind's callgrind,
the difference between a 2,000- and a 12,000-item run, start-up cancelled out), with
metrics off, on, and on with the dashboard's once-a-second sample held back (under
callgrind a run lasts about fifty times longer, so that sample weighs about fifty
times more per item than in a real run). Needs ``valgrind``; takes about two minutes.
"""

from __future__ import annotations

import functools
import operator
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest

from benchmarks._common import (
    Row,
    bench_main,
    callgrind_per_item,
    interleaved_clocks,
    median,
    paired_ratio,
    progress,
    rate_row,
)
from pipeflow import Pipeline, stage

STAGES = 3
WORKERS = 4
TARGET = 0.95  # runner-v2 issue: metrics on >= 0.95x off


async def identity(x: int) -> int:
    return x


def make_pipeline(name: str, registry: CollectorRegistry | None = None) -> Pipeline[int, int]:
    parts = [stage(workers=WORKERS, name=f"identity_{i + 1}")(identity) for i in range(STAGES)]
    return Pipeline(functools.reduce(operator.or_, parts), name=name, registry=registry)


def measure(n: int = 200_000, rounds: int = 9) -> list[Row]:
    """Time the pipeline with metrics on and off over ``range(n)``, ``rounds`` times
    each, interleaved; one row with the medians and their ratio."""
    registry = CollectorRegistry()
    on = make_pipeline("metrics_on", registry)
    off = make_pipeline("metrics_off")

    def run_on() -> None:
        result = on.run(range(n), collect=False, metrics_port=0)
        assert result.stats[f"identity_{STAGES}"].items_out == n

    def run_off() -> None:
        result = off.run(range(n), collect=False)
        assert result.stats[f"identity_{STAGES}"].items_out == n

    small = max(1, n // 20)  # warm up: first-call costs are not per item
    on.run(range(small), collect=False, metrics_port=0)
    off.run(range(small), collect=False)

    progress(f"metrics: {rounds} rounds x {n:,} items, metrics on and off interleaved")
    times = interleaved_clocks({"on": run_on, "off": run_off}, rounds)
    wall = {name: t["wall"] for name, t in times.items()}

    # What one scrape costs (it runs in the event loop when served by metrics_port).
    scrapes = []
    for _ in range(200):
        t0 = time.perf_counter()
        body = generate_latest(registry)
        scrapes.append(time.perf_counter() - t0)
    ok = registry.get_sample_value(
        "pipeflow_stage_items_total",
        {"pipeline": "metrics_on", "stage": f"identity_{STAGES}", "outcome": "ok"},
    )
    assert ok == n * rounds + small  # every round, and the warm-up

    return [
        rate_row(
            "metrics",
            f"metrics on vs off: {STAGES} identity stages x {WORKERS} workers, {n:,} items; CPU",
            n,
            times["on"]["cpu"],
            times["off"]["cpu"],
            target=(">=", TARGET),
            baseline_label="metrics off",
            detail={
                "stages": STAGES,
                "workers": WORKERS,
                "rounds": rounds,
                "clock": "cpu (time.process_time)",
                "wall_seconds": wall,
                # on / off in items/s by the wall clock (paired rounds)
                "wall_ratio": paired_ratio(wall["on"], wall["off"]),
                "scrape_ms_median": median(scrapes) * 1000,
                "scrape_bytes": len(body),
            },
            paired=True,
        )
    ]


#: Arguments of a short smoke run (``--quick``).
QUICK = {"n": 20_000, "rounds": 2}

#: The sides of ``--instructions``: metrics off, on, and on without the dashboard's
#: once-a-second sample (what "on" costs per item, apart from that sample).
ARMS = ("off", "on", "on_unsampled")


def run_arm(arm: str, n: int) -> None:
    """One side of ``--instructions`` in this process: a short warm-up, then ``n`` items."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    from pipeflow import _metrics

    interval = _metrics.DASHBOARD_INTERVAL
    if arm == "on_unsampled":
        _metrics.DASHBOARD_INTERVAL = 1e9  # the first sample only, at the start
    try:
        on = arm != "off"
        pipeline = make_pipeline(arm, CollectorRegistry() if on else None)
        options = {"metrics_port": 0} if on else {}
        pipeline.run(range(100), collect=False, **options)
        result = pipeline.run(range(n), collect=False, **options)
        assert result.stats[f"identity_{STAGES}"].items_out == n
    finally:
        _metrics.DASHBOARD_INTERVAL = interval


def count_instructions(small: int = 2_000, large: int = 12_000) -> dict[str, float]:
    """Instructions per item on each side of ``ARMS``."""
    return callgrind_per_item(__file__, "--arm", ARMS, small, large, label="metrics --instructions")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--arm"]:  # a child of --instructions
        run_arm(args[1], int(args[2]))
        return 0
    if args == ["--instructions"]:
        per_item = count_instructions()
        off = per_item["off"]
        print(f"machine instructions per item ({STAGES} identity stages x {WORKERS} workers)")
        for arm, count in per_item.items():
            print(f"  {arm:<14} {count:>10,.0f}   {count / off:.3f} of off")
        return 0
    return bench_main(__doc__, measure, QUICK, argv)


if __name__ == "__main__":
    sys.exit(main())
