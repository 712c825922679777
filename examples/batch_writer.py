"""Batch DB writer (from the Go worker-pool guide): insert events -> batches -> 8 writers.

Run it with::

    python examples/batch_writer.py                  # 20,000 events into a temporary DB
    python examples/batch_writer.py --events 100000 --db events.db

A stream of insert events is gathered into batches of up to 1,000 rows, or whatever
arrived within 100 ms (whichever comes first), and 8 writers insert each batch into
SQLite in one transaction (one connection each, 5 s per transaction at most). The
stream comes in two phases: a burst, which fills batches to 1,000, then a trickle, where
the 100 ms timer flushes small batches so that no row waits long.

At the end it prints the round-trip saving: rows written per transaction, and the same
rows written one transaction each (a small sample, timed) for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from pipeflow import Pipeline, RunResult
from pipeflow.stages import SQLiteSink

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount REAL NOT NULL
);
"""
COLUMNS = ["id", "user", "kind", "amount"]


def event(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "id": i,
        "user": f"user{rng.randrange(1000)}",
        "kind": rng.choice(("click", "view", "purchase")),
        "amount": round(rng.random() * 100, 2),
    }


async def insert_events(burst: int, trickle: int, seed: int = 1) -> AsyncIterator[dict[str, Any]]:
    """``burst`` events as fast as they come, then ``trickle`` more, 20 per 100 ms."""
    rng = random.Random(seed)
    for i in range(burst):
        yield event(i, rng)
    for i in range(burst, burst + trickle):
        if (i - burst) % 20 == 0:
            await trio.sleep(0.1)
        yield event(i, rng)


def build_pipeline(db: Path) -> Pipeline[dict[str, Any], int]:
    writer = SQLiteSink(
        db,
        "events",
        COLUMNS,
        name="write",
        batch=1000,  # up to 1,000 rows per transaction ...
        batch_timeout=0.1,  # ... or whatever arrived within 100 ms
        workers=8,  # 8 writers, one connection each
        tx_timeout=5.0,  # per transaction
        schema=SCHEMA,
        wal=True,  # readers never block the writers
    )
    return Pipeline(writer, name="batch_writer")


def row_at_a_time(db: Path, rows: int) -> float:
    """Seconds to insert ``rows`` rows with one transaction each (the baseline)."""
    rng = random.Random(2)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.executescript(SCHEMA.replace("events", "events_baseline"))
        sql = "INSERT INTO events_baseline (id, user, kind, amount) VALUES (?, ?, ?, ?)"
        t0 = time.perf_counter()
        for i in range(rows):
            e = event(i, rng)
            conn.execute("BEGIN")
            conn.execute(sql, [e[c] for c in COLUMNS])
            conn.execute("COMMIT")
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> RunResult[int]:
    """Write the events, print the saving, return the :class:`RunResult` (its outputs are
    the rows of each transaction)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events in the burst")
    parser.add_argument("--trickle", type=int, default=100, help="events after the burst")
    parser.add_argument("--compare", type=int, default=200, help="rows for the baseline")
    parser.add_argument("--db", type=Path, help="SQLite file to keep (default: temporary)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db if args.db is not None else Path(tmp) / "events.db"
        pipeline = build_pipeline(db)
        result = pipeline.run(insert_events(args.events, args.trickle))
        baseline = row_at_a_time(db, args.compare) if args.compare else None
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (stored,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()

    rows, transactions = sum(result.outputs), len(result.outputs)
    s = result.stats["write"]
    sizes = sorted(result.outputs, reverse=True)
    print(f"{rows:,} rows in {transactions} transactions in {result.elapsed:.2f}s")
    print(f"batch sizes: {sizes[:3]} ... {sizes[-3:]} (full batches, then 100 ms flushes)")
    print(
        f"writers: {s.workers}, p99 transaction {s.duration_p99 * 1000:.1f} ms, "
        f"{s.throughput:,.0f} rows/s"
    )
    print(f"round trips: {rows / max(transactions, 1):,.0f}x fewer than one per row")
    if baseline is not None:
        per_row = baseline / args.compare
        # Writer time per row: the seconds the writers spent in transactions, per row.
        batched = s.busy_seconds / max(rows, 1)
        print(
            f"one transaction per row: {per_row * 1e6:,.0f} µs/row ({args.compare} rows timed); "
            f"batched: {batched * 1e6:,.1f} µs/row of writer time ({per_row / batched:,.0f}x less)"
        )
    print(f"{stored:,} rows in table events")
    return result


if __name__ == "__main__":
    main()
