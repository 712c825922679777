"""Telemetry: drop on full, with a counter (the third backpressure strategy).

Run it with::

    python examples/telemetry.py                 # 5 bursts of 2,000 events
    python examples/telemetry.py --bursts 20 --out events.jsonl

Telemetry is non-critical: the code that emits it must never wait for it. So the
producer calls ``flow.offer(event)``, which puts the event into the pipeline if there is
room and otherwise drops it at once, returns False and counts the drop
(``stats.dropped``), like the Go worker-pool guide's ``select`` with a ``default:``
branch that bumps ``droppedCounter``. The pipeline enriches each event and appends it
to a JSON-lines file with the built-in ``JsonLinesSink``. Bursts bigger than the
pipeline can hold lose their tail; the quiet time between bursts lets it drain.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import trio

from pipeflow import Pipeline, RunResult, stage
from pipeflow.stages import JsonLinesSink


@stage(workers=2, buffer=256)
async def enrich(event: dict[str, Any]) -> dict[str, Any]:
    """Add what every event carries (here: the host and the service)."""
    return {**event, "host": "web-1", "service": "checkout"}


def build_pipeline(out: Path) -> Pipeline[dict[str, Any], dict[str, Any]]:
    return Pipeline(enrich | JsonLinesSink(out, name="ship"), name="telemetry")


async def emit(pipeline: Pipeline[Any, Any], bursts: int, size: int, gap: float) -> RunResult[Any]:
    """Offer ``bursts`` bursts of ``size`` events, ``gap`` seconds apart; never wait."""
    async with pipeline.open() as flow:
        for b in range(bursts):
            accepted = 0
            for i in range(size):
                # offer() never blocks: the request path that emits telemetry stays fast.
                accepted += flow.offer({"burst": b, "seq": i, "event": "page_view"})
                if i % 100 == 99:
                    await trio.lowlevel.checkpoint()  # the emitter does other work too
            dropped = flow.stats()["enrich"].dropped
            print(f"burst {b}: {accepted:,} of {size:,} accepted; {dropped:,} dropped so far")
            await trio.sleep(gap)
    assert flow.result is not None
    return flow.result


def main(argv: list[str] | None = None) -> RunResult[Any]:
    """Emit the bursts, print what was kept and dropped, return the :class:`RunResult`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--size", type=int, default=2000, help="events per burst")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between bursts")
    parser.add_argument("--out", type=Path, help="JSON-lines file to keep (default: temporary)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out if args.out is not None else Path(tmp) / "events.jsonl"
        result = trio.run(emit, build_pipeline(out), args.bursts, args.size, args.gap)
        with out.open(encoding="utf-8") as f:
            lines = sum(1 for _ in f)

    s = result.stats["enrich"]
    offered = args.bursts * args.size
    print(
        f"offered {offered:,}, accepted {s.items_in - s.dropped:,}, dropped {s.dropped:,} "
        f"({s.dropped / offered:.0%}); {lines:,} lines written"
    )
    return result


if __name__ == "__main__":
    main()
