"""Quick start: fetch | parse | store, offline, and where the bottleneck is.

Run it with::

    python examples/quickstart.py            # 200 pages
    python examples/quickstart.py --pages 50

``fetch`` stands in for an HTTP call (it sleeps 50 ms per page, 16 at a time), ``parse``
is a plain function run in 4 worker threads, ``store`` writes rows into SQLite with one
connection per worker. At the end pipeflow prints what each stage did and names the
stage that limited throughput, with the worker count Little's Law recommends for it.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from pipeflow import Pipeline, RunResult, stage

PAGE = "<html><title>Page {n}</title><body>{words}</body></html>"


@stage(workers=16)
async def fetch(n: int) -> str:
    await trio.sleep(0.05)  # the network
    return PAGE.format(n=n, words=" ".join(f"word{i}" for i in range(n % 50)))


@stage(workers=4)
def parse(html: str) -> tuple[str, int]:
    title = re.search(r"<title>(.*?)</title>", html)
    body = re.search(r"<body>(.*?)</body>", html)
    assert title is not None
    assert body is not None
    return title.group(1), len(body.group(1).split())


def make_store(db_path: Path):
    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[sqlite3.Connection]:
        conn = sqlite3.connect(db_path, timeout=10)
        try:
            yield conn
        finally:
            conn.close()

    @stage(workers=1, resource=connection)
    async def store(row: tuple[str, int], conn: sqlite3.Connection) -> str:
        await trio.sleep(0.01)  # a slow disk
        with conn:
            conn.execute("INSERT INTO pages (title, words) VALUES (?, ?)", row)
        return row[0]

    return store


def print_report(result: RunResult[str]) -> None:
    print(f"{len(result.outputs)} pages in {result.elapsed:.2f}s")
    print(
        f"{'stage':<8} {'in':>5} {'out':>5} {'workers':>7} {'busy':>6} {'items/s':>8} {'p99 ms':>7}"
    )
    for name, s in result.stats.items():
        print(
            f"{name:<8} {s.items_in:>5} {s.items_out:>5} {s.workers:>7} "
            f"{s.busy_fraction:>6.0%} {s.throughput:>8.1f} {s.duration_p99 * 1000:>7.1f}"
        )
    if result.bottleneck:
        s = result.stats[result.bottleneck]
        print(
            f"bottleneck: {result.bottleneck} ({s.busy_fraction:.0%} busy); "
            f"Little's Law recommends {s.recommended_workers} workers for this rate"
        )


def main(argv: list[str] | None = None) -> RunResult[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "pages.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE pages (title TEXT, words INTEGER)")
        result = Pipeline(fetch | parse | make_store(db), name="quickstart").run(range(args.pages))
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (rows,) = conn.execute("SELECT COUNT(*) FROM pages").fetchone()
    print_report(result)
    print(f"{rows} rows stored in SQLite")
    return result


if __name__ == "__main__":
    main()
