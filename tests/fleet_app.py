"""One member of a fleet, for the fleet tests: the same pipeline in every process.

    FLEET_RESULTS_URL=redis://127.0.0.1:6379/0 FLEET_CONSUMER=a \
        pipeflow run tests.fleet_app:pipeline \
        --source 'redis://127.0.0.1:6379/0?stream=jobs&group=workers&consumer=a&drain=1'

Reads ``jobs`` as consumer ``a`` of group ``workers``, works on each entry (20 ms), and
appends the result, tagged ``by`` the consumer's name, to the stream ``results``.
``python tests/fleet_app.py SOURCE_URL`` does the same without the CLI.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit, urlunsplit

import trio

from pipeflow import Pipeline, stage
from pipeflow.connectors.redis import Entry, RedisStreamSink, RedisStreamSource

RESULTS_URL = os.environ.get("FLEET_RESULTS_URL", "redis://127.0.0.1:6379/0")
CONSUMER = os.environ.get("FLEET_CONSUMER", "")


@stage(workers=4)
async def work(entry: Entry) -> Entry:
    await trio.sleep(0.02)  # stands in for real work (an HTTP call, a query)
    n = int(entry.fields["n"])
    return entry.with_fields(n=n, square=n * n, by=CONSUMER)


def build(results_url: str) -> Pipeline[Entry, str]:
    return Pipeline(work | RedisStreamSink(results_url, "results", workers=2), name="fleet")


pipeline = build(RESULTS_URL)


def main(argv: list[str]) -> None:
    global CONSUMER
    source = RedisStreamSource.from_url(argv[1])
    CONSUMER = source.consumer
    server = urlunsplit(urlsplit(argv[1])._replace(query=""))
    build(server).run(source, collect=False)


if __name__ == "__main__":
    main(sys.argv)
