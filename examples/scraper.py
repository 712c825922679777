"""Web scraper (from the Go worker-pool guide): fetch -> parse -> batched store.

Run it with::

    python examples/scraper.py                    # a local site, 120 pages, no internet
    python examples/scraper.py --pages 300
    python examples/scraper.py --urls urls.txt    # real URLs, one per line
    python examples/scraper.py --db pages.db      # keep the database

The pipeline is the Go guide's: 64 fetch workers (the remote site tolerates 64 in parallel)
under a 50 requests/s token bucket, a 10 s timeout per request, HTML parsed by a plain
function in worker threads, and rows written to SQLite 100 at a time, one transaction
per batch. A failed page does not stop the run (``errors="collect"``): every failure is
reported at the end, like the Go guide's multierr.

Without ``--urls`` the example serves a small site itself on 127.0.0.1 (a Trio HTTP
server in the same process): pages that link to each other, one that answers 404, one
that answers 500 (retried, then reported) and one that is slow.

Needs httpx (``pip install 'pipeflow-trio[http]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import re
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import trio

from pipeflow import Pipeline, RunResult, stage
from pipeflow.stages import HttpFetch, HttpResult, SQLiteSink

SCHEMA = """
CREATE TABLE IF NOT EXISTS pages (
    url TEXT PRIMARY KEY,
    status INTEGER,
    title TEXT,
    words INTEGER,
    links INTEGER
);
"""

# -- the local site --------------------------------------------------------------------

SLOW_SECONDS = 0.8


def site_urls(base: str, pages: int) -> list[str]:
    """The local site's URLs: ``pages`` good pages plus the three troublemakers."""
    urls = [f"{base}/page/{n}" for n in range(pages)]
    # Spread the special pages through the list, as on a real crawl.
    for i, path in enumerate(("/missing", "/broken", "/slow")):
        urls.insert((i + 1) * len(urls) // 4, base + path)
    return urls


def render_page(n: int) -> str:
    links = "".join(f'<a href="/page/{(n * 7 + k) % 997}">next {k}</a> ' for k in range(3))
    words = " ".join(f"word{(n + i) % 31}" for i in range(20 + n % 40))
    return (
        f"<!doctype html><html><head><title>Page {n}</title></head>"
        f"<body><h1>Page {n}</h1><p>{words}</p><nav>{links}</nav></body></html>"
    )


async def site_response(target: str) -> tuple[int, str]:
    """Status and HTML body for a path of the local site."""
    if target.startswith("/page/") and target[6:].isdigit():
        return 200, render_page(int(target[6:]))
    if target == "/slow":
        await trio.sleep(SLOW_SECONDS)
        return 200, render_page(999)
    if target == "/broken":
        return 500, "<html><title>Internal Server Error</title></html>"
    return 404, "<html><title>Not Found</title></html>"


async def _serve_connection(stream: trio.SocketStream) -> None:
    """HTTP/1.1 on one connection with h11 (httpx's own HTTP engine): keep-alive, GET."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
                continue
            if isinstance(event, h11.Request):
                status, body = await site_response(event.target.decode())
                payload = body.encode()
                headers = [
                    ("content-type", "text/html; charset=utf-8"),
                    ("content-length", str(len(payload))),
                ]
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=payload))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
            elif isinstance(event, h11.ConnectionClosed):
                return
            elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def local_site() -> AsyncIterator[str]:
    """Serve the site on a free port of 127.0.0.1; yield its base URL."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, _serve_connection, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        host, port = listeners[0].socket.getsockname()[:2]
        try:
            yield f"http://{host}:{port}"
        finally:
            nursery.cancel_scope.cancel()


# -- the pipeline ----------------------------------------------------------------------

_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TAG = re.compile(r"<[^>]+>")
_LINK = re.compile(r"<a\s[^>]*href=", re.I)


@stage(workers=4)
def parse(page: HttpResult) -> dict[str, Any]:
    """Extract the structured data of a page (a plain function: runs in threads)."""
    text = page.text
    title = _TITLE.search(text)
    body = _TAG.sub(" ", text)
    return {
        "url": page.url,
        "status": page.status,
        "title": html.unescape(title.group(1).strip()) if title else "",
        "words": len(body.split()),
        "links": len(_LINK.findall(text)),
    }


def build_pipeline(db: Path, *, timeout: float = 10.0, rate: float = 50.0) -> Pipeline[str, int]:
    """URLs -> fetch (64 workers, ``rate`` req/s, ``timeout`` s) -> parse -> SQLite."""
    fetch = HttpFetch(
        name="fetch",
        workers=64,  # the site tolerates 64 requests in parallel
        rate=rate,  # the token bucket: below the 64 cap, leaves headroom
        timeout=timeout,  # per request
        retries=2,  # transport errors, timeouts and 5xx, with backoff
        backoff=0.1,
        errors="collect",  # log, continue, report every failure at the end
    )
    store = SQLiteSink(
        db,
        "pages",
        ["url", "status", "title", "words", "links"],
        name="store",
        batch=100,  # one transaction per 100 rows
        schema=SCHEMA,
        on_conflict="replace",  # scraping a page again updates its row
    )
    return Pipeline(fetch | parse | store, name="scraper")


def read_urls(path: Path) -> Iterator[str]:
    """URLs from a file, one per line, read lazily (blank lines and # comments skipped)."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            url = line.strip()
            if url and not url.startswith("#"):
                yield url


def print_report(
    result: RunResult[Any], pipeline: Pipeline[Any, Any] | None = None, file: Any = None
) -> None:
    """The run report: each stage's figures, the bottleneck, then every failure.

    A stage whose workers spent most of their time waiting for its ``rate=`` token
    bucket is reported as rate-limited: more workers would not make it faster. Given the
    ``pipeline``, the report also names the limit.
    """
    out = file if file is not None else sys.stdout
    rows = sum(result.outputs)
    print(f"scraped {rows} pages in {result.elapsed:.2f}s", file=out)
    print(
        f"{'stage':<10} {'in':>6} {'out':>6} {'failed':>6} {'retried':>7} "
        f"{'workers':>7} {'busy':>5} {'items/s':>8} {'p99':>9}",
        file=out,
    )
    for name, s in result.stats.items():
        print(
            f"{name:<10} {s.items_in:>6} {s.items_out:>6} {s.failed:>6} {s.retried:>7} "
            f"{s.workers:>7} {s.busy_fraction:>5.0%} {s.throughput:>8.1f} "
            f"{s.duration_p99 * 1000:>6.0f} ms",
            file=out,
        )
    rates = {st.name: st.options.rate for st in pipeline.stages} if pipeline else {}
    throttled = [
        (name, s.throttled_seconds / (s.mean_workers * result.elapsed))
        for name, s in result.stats.items()
        if s.mean_workers * result.elapsed > 0
        and s.throttled_seconds >= 0.2 * s.mean_workers * result.elapsed
    ]
    if result.bottleneck is not None:
        s = result.stats[result.bottleneck]
        print(
            f"bottleneck: {result.bottleneck} ({s.busy_fraction:.0%} busy, "
            f"{s.utilisation:.0%} utilised); Little's Law recommends "
            f"{s.recommended_workers} workers for {s.throughput:.1f} items/s",
            file=out,
        )
    elif throttled:
        name, share = max(throttled, key=lambda t: t[1])
        s = result.stats[name]
        rate = rates.get(name)
        # Requests per second, retries included: what the token bucket let through.
        sent = (s.items_in - s.dropped + s.retried) / result.elapsed
        limit = f" ({sent:.1f} of {rate:g} requests/s)" if rate else ""
        print(
            f"bottleneck: the rate limit of {name}{limit}: its workers spent {share:.0%} "
            f"of their time waiting for a token, so more workers would not help; "
            f"raise rate= if the site allows it",
            file=out,
        )
    else:
        print(
            "bottleneck: none (no stage was busy half the time: the pipeline waited for "
            "its input, or for its slowest pages)",
            file=out,
        )
    if result.errors:
        print(f"{len(result.errors)} failed:", file=out)
        for err in result.errors:
            cause = err.__cause__
            print(f"  {err.item}: {type(cause).__name__}: {cause}", file=out)


Watch = Callable[[Pipeline[Any, Any]], Awaitable[None]]


async def scrape(
    pipeline: Pipeline[str, int], urls: Any, *, watch: Watch | None = None
) -> RunResult[int]:
    """Run the scraper over ``urls``; ``watch(pipeline)``, if given, runs alongside
    (a live progress view reads ``pipeline.current_stats()``) and is cancelled at the end."""
    if watch is None:
        return await pipeline.arun(urls)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, pipeline)
        result = await pipeline.arun(urls)
        nursery.cancel_scope.cancel()
    return result


def main(
    argv: list[str] | None = None,
    *,
    watch: Watch | None = None,
    report: Callable[[RunResult[int], Pipeline[Any, Any]], None] | None = None,
) -> RunResult[int]:
    """Scrape, print the report, return the :class:`RunResult` (outputs: rows per batch).

    ``watch``, an async function, is called with the pipeline and runs beside it (a live
    progress view); it is cancelled when the run ends. ``report``, if given, prints the
    report instead of :func:`print_report` (``pipeflow demo`` prints its own).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=Path, help="file of URLs, one per line")
    parser.add_argument("--pages", type=int, default=120, help="local site pages (default 120)")
    parser.add_argument("--db", type=Path, help="SQLite file to keep (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    args = parser.parse_args(argv)

    async def run(pipeline: Pipeline[str, int]) -> RunResult[int]:
        if args.urls is not None:
            return await scrape(pipeline, read_urls(args.urls), watch=watch)
        async with local_site() as base:
            print(f"serving a local site on {base}")
            return await scrape(pipeline, site_urls(base, args.pages), watch=watch)

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db if args.db is not None else Path(tmp) / "pages.db"
        pipeline = build_pipeline(db, timeout=args.timeout, rate=args.rate)
        result = trio.run(run, pipeline)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (stored,) = conn.execute("SELECT COUNT(*) FROM pages").fetchone()
    (report or print_report)(result, pipeline)
    print(f"{stored} rows in table pages of {db if args.db else 'a temporary database'}")
    return result


if __name__ == "__main__":
    main()
