"""The Redis Streams connector and the runner's acking protocol: who acks what, when.

The first tests below are bugs found in review (strict xfails once, passing since their
fixes; each says what should happen); the others pin down behaviour worth keeping.
Everything runs against a real redis-server on
127.0.0.1, on the real clock, each test bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from pipeflow import Failed, Pipeline, StageError, stage
from pipeflow.testing import assert_nothing_left_running

redis = pytest.importorskip("redis", reason="the redis client is not installed")

import pipeflow.connectors.redis as redis_connector  # noqa: E402 - after the importorskip
from pipeflow.connectors.redis import (  # noqa: E402
    Entry,
    RedisStreamSource,
)
from tests.redis_server import (  # noqa: E402
    BINARY,
    RedisServer,
    add_jobs,
    pending_ids,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if BINARY is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    srv = RedisServer(tmp_path_factory.mktemp("review-redis"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def r(server: RedisServer) -> Iterator[Any]:
    """A plain client on an empty database."""
    with server.client() as client:
        client.flushall()
        yield client


@pytest.fixture
def url(server: RedisServer) -> str:
    return server.url


def source(url: str, **options: Any) -> RedisStreamSource:
    options = {"group": "workers", "consumer": "a", "drain": True, **options}
    return RedisStreamSource(url, "jobs", **options)


# -- bugs found in review (fixed), most severe first ---------------------------------------


async def test_batch_sink_without_timeout_drains(r, url):
    """drain=True with a batch stage that flushes only at the end of the stream (no
    batch_timeout): the source ends once nothing else is left, the last partial batch
    flushes, and every entry is acked."""
    add_jobs(r, 25)
    written: list[int] = []

    @stage(batch=10)
    async def write(rows: list[Entry]) -> int:
        written.append(len(rows))
        return len(rows)

    with trio.fail_after(5):
        await Pipeline(write).arun(source(url))
    assert [10, 10, 5] == written
    assert set() == pending_ids(r)


async def test_dead_letter_batch_stage_does_not_hang(r, url):
    """A batched dead-letter stage holds failed items (and their acks) until its batch
    fills: the source must be allowed enough un-acked entries for that."""
    add_jobs(r, 12)
    letters: list[Any] = []

    @stage
    async def write_letters(batch: list[Failed[Entry]]) -> None:
        letters.extend(batch)

    @stage(workers=2, errors="skip", dead_letter=write_letters.with_options(batch=10))
    async def always_fails(entry: Entry) -> Entry:
        raise ValueError(entry.id)

    with trio.fail_after(2):
        await Pipeline(always_fails).arun(source(url))
    assert 12 == len(letters)
    assert set() == pending_ids(r)


async def test_an_item_dead_lettered_as_a_fail_fast_run_stops_is_acked(r, url):
    """A dead-letter stage outlives the main stages so that failed items still reach it
    when a fail-fast error stops the run; having taken over the item's ack, it must
    still be able to ack it."""
    ids = add_jobs(r, 2)
    letters: list[str] = []
    failing = trio.Event()

    @stage
    async def slow_letters(failed: Failed[Entry]) -> None:
        await failing.wait()
        await trio.sleep(0.2)  # the fail-fast error stops the main stages meanwhile
        letters.append(failed.item.id)

    @stage(workers=2, errors="skip", dead_letter=slow_letters)
    async def skip_first(entry: Entry) -> Entry:
        if entry.id == ids[0]:
            raise ValueError("to the dead letters")
        return entry

    @stage
    async def fail_second(entry: Entry) -> Entry:
        await trio.sleep(0.05)
        failing.set()
        raise RuntimeError("fail fast")

    with trio.fail_after(5), pytest.raises(StageError):
        await Pipeline(skip_first | fail_second).arun(source(url))
    assert [ids[0]] == letters
    assert ids[0] not in pending_ids(r)


async def test_two_sources_in_one_process_do_not_share_a_consumer_name(r, url):
    """Two pipelines in one process over one group, each with the default consumer
    name: each entry is processed once (the second source must not take the first
    one's in-flight entries for its own pending ones)."""
    add_jobs(r, 4)
    release = trio.Event()
    seen: list[str] = []
    all_held = trio.Event()

    @stage(workers=4)
    async def held(entry: Entry) -> Entry:
        seen.append(entry.id)
        if len(seen) == 4:
            all_held.set()
        await release.wait()
        return entry

    @stage(workers=4)
    async def record(entry: Entry) -> Entry:
        seen.append(entry.id)
        return entry

    def default_consumer() -> RedisStreamSource:
        return RedisStreamSource(url, "jobs", group="workers", drain=True)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Pipeline(held).arun, default_consumer())
            await all_held.wait()
            with trio.move_on_after(1.0):
                await Pipeline(record).arun(default_consumer())
            release.set()
    assert 4 == len(seen), seen


def test_a_password_given_as_a_query_parameter_is_not_shown():
    """from_url documents `password` as a query parameter: it must be redacted like the
    one in the netloc, in repr() and in error messages."""
    good = "redis://127.0.0.1:6379/0?stream=s&group=g&password=hunter2"
    assert "hunter2" not in repr(RedisStreamSource.from_url(good))
    with pytest.raises(ValueError, match="drain='maybe'") as info:
        RedisStreamSource.from_url(good + "&drain=maybe")
    assert "hunter2" not in str(info.value)


async def test_cancelling_a_run_is_prompt_while_redis_does_not_answer(tmp_path):
    """The module says reads block for at most `block` seconds, so that cancelling a
    run is prompt; that must hold too when Redis hangs (SIGSTOP: a frozen server, or a
    network partition) rather than refusing connections."""
    if BINARY is None:
        pytest.skip("redis-server is not installed")
    frozen = RedisServer(tmp_path)
    assert frozen.proc is not None
    pid = frozen.proc.pid
    # Thawed by an OS timer, so that the test ends even if the run cannot be cancelled.
    thaw = threading.Timer(2.0, os.kill, (pid, signal.SIGCONT))
    try:

        @stage
        async def same(entry: Entry) -> Entry:
            return entry

        run_source = RedisStreamSource(frozen.url, "jobs", group="workers", consumer="a", block=0.1)
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Pipeline(same).arun, run_source)
                await trio.sleep(0.3)  # reading, one short block after another
                os.kill(pid, signal.SIGSTOP)
                thaw.start()
                await trio.sleep(0.3)
                t0 = trio.current_time()
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - t0
    finally:
        thaw.cancel()
        os.kill(pid, signal.SIGCONT)
        frozen.stop()
    assert elapsed < 0.5


async def test_an_entry_held_by_a_direct_iteration_is_kept_fresh(r, url):
    """`async for entry in source`: while the loop body works on an entry for longer
    than claim_idle, the consumer is alive and keeps it; another consumer must not take
    it over and process it a second time."""
    add_jobs(r, 1)
    taken = trio.Event()
    by_b: list[str] = []

    @stage
    async def record(entry: Entry) -> Entry:
        by_b.append(entry.id)
        return entry

    async def iterate_slowly() -> None:
        async with contextlib.aclosing(source(url, claim_idle=0.2).__aiter__()) as entries:
            async for _entry in entries:
                taken.set()
                await trio.sleep(1.0)  # working on it, five times claim_idle

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(iterate_slowly)
            await taken.wait()
            other = source(url, consumer="b", claim_idle=0.2)
            await Pipeline(record).arun(other)
    assert [] == by_b


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ("redis://127.0.0.1:6379/0?stream=s&group=g&claimidle=5", "claimidle"),
        ("redis://127.0.0.1:99999/0?stream=s&group=g", "99999"),
        ("redis://127.0.0.1:6379/zero?stream=s&group=g", "zero"),
    ],
)
def test_from_url_rejects_a_url_the_run_cannot_use(query, word):
    """A --source URL with a misspelt option, a port out of range or a database that is
    not a number fails in from_url with a message naming it (the CLI shows it as
    "--source: ..."), not later, at the first command, with a redis-py TypeError, a
    bare "Port out of range 0-65535", or silently on database 0."""
    with pytest.raises(ValueError, match=word):
        RedisStreamSource.from_url(query)


async def test_a_consumer_name_redis_accepts_does_not_fail_the_run(r, url):
    """Any non-empty str is a valid consumer name for XREADGROUP; the connection's
    CLIENT SETNAME (which refuses non-ASCII) must not make the run fail."""
    (entry_id,) = add_jobs(r, 1)

    @stage
    async def same(entry: Entry) -> Entry:
        return entry

    with trio.fail_after(5):
        result = await Pipeline(same).arun(source(url, consumer="worker-jörg"))
    assert [entry_id] == [entry.id for entry in result.outputs]
    assert set() == pending_ids(r)


# -- behaviour worth keeping ---------------------------------------------------------------


@pytest.mark.parametrize("buffer", [0, 10])
async def test_outputs_read_from_a_stream_are_all_acked(r, url, buffer):
    """pipeline.stream(source) with a reader slower than the pipeline: each output is
    acked when the reader takes it, the last ones included."""
    ids = add_jobs(r, 20)

    @stage
    async def same(entry: Entry) -> Entry:
        return entry

    seen: list[str] = []
    with trio.fail_after(5):
        async with Pipeline(same).stream(source(url), buffer=buffer) as outputs:
            async for entry in outputs:
                seen.append(entry.id)
                await trio.sleep(0.01)  # a reader slower than the pipeline
    assert ids == seen
    assert set() == pending_ids(r)


async def test_nothing_left_running_after_a_cancelled_endless_source(r, url):
    """A drain=False source cancelled while its read blocks: the run ends within about
    `block`, and no pipeflow task or thread is left behind."""
    add_jobs(r, 3)

    @stage
    async def same(entry: Entry) -> Entry:
        return entry

    with trio.fail_after(5):
        t0 = trio.current_time()
        with trio.move_on_after(0.3):
            await Pipeline(same).arun(source(url, drain=False, block=0.2))
    assert trio.current_time() - t0 < 0.3 + 0.2 + 0.2  # the cancel waits one read at most
    assert set() == pending_ids(r)
    assert_nothing_left_running()


async def test_finished_entries_are_acked_soon_while_the_source_does_not_read(r, url):
    """A slow first stage with a small buffer, and a stage after it with a big one:
    the source reads as many entries as the run can hold and hands them over one at a
    time, so it does not read for seconds. The entries finished meanwhile are acked
    within a fraction of a second all the same (they do not wait for the next read to
    take their XACK along), and so are those of a source waiting for new entries."""
    add_jobs(r, 40)
    done: list[str] = []

    @stage(buffer=1)
    async def slow(entry: Entry) -> Entry:
        await trio.sleep(0.05)
        return entry

    @stage(buffer=32)
    async def then(entry: Entry) -> Entry:
        done.append(entry.id)
        return entry

    src = source(url, count=100)

    async def check() -> None:
        await trio.sleep(1.0)
        finished, acked = len(done), src.statistics().acked
        # (those finished within the last ~0.3 s may still wait for their XACK)
        assert finished - 6 <= acked <= finished

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(check)
            await Pipeline(slow | then).arun(src)
    assert set() == pending_ids(r)

    # A source with nothing new to read waits (up to block) rather than reads: what
    # finished is acked at once, not after that wait.
    add_jobs(r, 3)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Pipeline(slow).arun, source(url, drain=False, block=2.0))
            await trio.sleep(0.6)
            assert set() == pending_ids(r)
            nursery.cancel_scope.cancel()


async def test_an_entry_the_run_never_finished_does_not_hang_the_source(r, url, monkeypatch):
    """The runner's hook used as a runner that lost track of an item would: the run ends
    well, but one entry it took is never finished. The source waits a while for it, then
    says so (``redis_entries_unfinished``, with the count) and leaves, rather than wait
    for ever; the entry stays pending, handed back: another member takes it at once and
    acks it. (Real sockets: on the real clock, the limit made short for the test.)"""
    monkeypatch.setattr(redis_connector, "_SETTLE_LIMIT", 0.5)
    add_jobs(r, 5)
    with capture_logs() as logs, trio.fail_after(10):
        async with source(url).__pipeflow_open__(capacity=10) as entries:
            items, keys = await entries._pipeflow_take_keyed(10)
            assert len(items) == 5
            entries.finished_many(keys[:4])  # the fifth never finishes
            t0 = trio.current_time()
        waited = trio.current_time() - t0
    assert 0.5 <= waited < 3
    [event] = [e for e in logs if e["event"] == "redis_entries_unfinished"]
    assert event["log_level"] == "warning"
    assert event["entries"] == 1
    assert {keys[4]} == pending_ids(r)  # left pending: not lost, not acked

    with trio.fail_after(10):
        result = await Pipeline(stage(lambda entry: entry.id)).arun(source(url, consumer="b"))
    assert [keys[4]] == result.outputs
    assert set() == pending_ids(r)
