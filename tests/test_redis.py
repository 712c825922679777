"""Redis Streams connector, against a real redis-server on 127.0.0.1.

A session-wide server is started on a free port (no persistence) and stopped by its PID;
the restart test starts one of its own with the append-only file on. Entries really go
through Redis and worker threads, so these tests run on the real clock, each bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import pickle
import re
import signal
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from pipeflow import Failed, Pipeline, StageError, stage
from pipeflow.testing import assert_nothing_left_running

redis = pytest.importorskip("redis", reason="the redis client is not installed")

from pipeflow.connectors.redis import (  # noqa: E402 - after the importorskip
    ConsumerGroupLost,
    Entry,
    RedisStreamSink,
    RedisStreamSource,
    RedisUnavailable,
    SourceStatistics,
)
from tests.redis_server import (  # noqa: E402
    BINARY,
    RedisServer,
    add_jobs,
    eventually,
    free_port,
    own_redis_server,
    pending_ids,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if BINARY is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[Any]:
    """A plain client on an empty database."""
    with redis_server.client() as client:
        client.flushall()
        yield client


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


def source_ids(client: Any, stream: str = "results") -> list[str]:
    return [fields["source_id"] for _, fields in client.xrange(stream)]


@stage(workers=4)
async def square(entry: Entry) -> Entry:
    n = int(entry.fields["n"])
    return entry.with_fields(n=n, square=n * n)


# -- end to end --------------------------------------------------------------------------


async def test_every_entry_is_processed_and_acked(r, url):
    """source -> stage -> sink with drain=True: every entry is written once, with its
    source id, and the group has nothing pending at the end."""
    ids = add_jobs(r, 200)
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with trio.fail_after(20):
        result = await Pipeline(square | RedisStreamSink(url, "results", workers=4)).arun(source)
    assert sorted(ids) == sorted(source_ids(r))
    assert {str(int(f["n"]) ** 2) for _, f in r.xrange("results")} == {
        f["square"] for _, f in r.xrange("results")
    }
    assert 0 == r.xpending("jobs", "workers")["pending"]
    assert [] == r.xinfo_consumers("jobs", "workers")  # it left the group, nothing pending
    assert 200 == len(result.outputs)  # the sink's outputs are the new entries' ids
    stats = SourceStatistics(acked=200, reclaimed=0, reconnects=0, pending=0)
    assert stats == source.statistics()
    assert set(result.outputs) == {entry_id for entry_id, _ in r.xrange("results")}
    assert_nothing_left_running()


async def test_a_flat_map_acks_once_every_child_is_done(r, url):
    """An entry split into two children stays pending while one child is still on its
    way, and is acked once both have left the pipeline."""
    (entry_id,) = add_jobs(r, 1)
    release = trio.Event()

    @stage
    async def split(entry: Entry):
        yield entry.with_fields(part="fast")
        yield entry.with_fields(part="slow")

    @stage(workers=2)
    async def gate(entry: Entry) -> Entry:
        if entry.fields["part"] == "slow":
            await release.wait()
        return entry

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    pipeline = Pipeline(split | gate | RedisStreamSink(url, "results"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.arun, source)
            await eventually(lambda: r.xlen("results") >= 1)
            await trio.sleep(0.1)  # time enough for a wrong, early XACK
            assert {entry_id} == await trio.to_thread.run_sync(pending_ids, r)
            assert (0, 1) == (source.statistics().acked, source.statistics().pending)
            release.set()
    assert [entry_id, entry_id] == source_ids(r)
    assert set() == pending_ids(r)


@pytest.mark.parametrize("batch", [None, 50])
async def test_what_a_run_holds_for_an_entry_is_freed_once_it_is_acked(r, url, batch):
    """An entry's envelope through the run (which is also its ack) is freed once the
    entry is acked, one by one or a batch at a time, without waiting for the garbage
    collector: no reference cycle is left per entry."""
    add_jobs(r, 300)

    @stage(workers=4)
    async def work(entry: Entry) -> Entry:
        return entry.with_fields(done="1")

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    sink = RedisStreamSink(url, "results", batch=batch)
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(10):
            await Pipeline(work | sink).arun(source, collect=False)
        left = [o for o in gc.get_objects() if type(o).__name__ == "KeyedAckEnv"]
    finally:
        gc.enable()
    assert [] == left
    assert 300 == r.xlen("results")
    assert set() == pending_ids(r)


async def test_an_entry_split_across_batches_is_acked_after_its_last_batch(r, url):
    """A flat-map's children in different batches of a batched sink (whose items are
    acked together): the entry stays pending until the batch with its last child is
    written, then is acked once."""
    (entry_id,) = add_jobs(r, 1)
    release = trio.Event()

    @stage
    async def split(entry: Entry):
        for k in range(5):
            yield entry.with_fields(k=k)

    @stage
    async def gate(entry: Entry) -> Entry:
        if entry.fields["k"] == "4":
            await release.wait()
        return entry

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    sink = RedisStreamSink(url, "results", batch=2, batch_timeout=0.05)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Pipeline(split | gate | sink).arun, source)
            await eventually(lambda: r.xlen("results") >= 4)
            await trio.sleep(0.1)  # time enough for a wrong, early XACK
            assert {entry_id} == await trio.to_thread.run_sync(pending_ids, r)
            assert (0, 1) == (source.statistics().acked, source.statistics().pending)
            release.set()
    assert [entry_id] * 5 == source_ids(r)
    assert set() == pending_ids(r)
    assert 1 == source.statistics().acked


async def test_filtered_and_multiplied_entries_are_all_acked(r, url):
    """A stage yielding 0, 1 or 2 outputs per entry: every entry is acked, every output
    written."""
    add_jobs(r, 30)

    @stage(workers=3)
    async def fan(entry: Entry):
        for k in range(int(entry.fields["n"]) % 3):
            yield entry.with_fields(k=k)

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with trio.fail_after(10):
        await Pipeline(fan | RedisStreamSink(url, "results")).arun(source)
    assert 30 == r.xlen("jobs")
    assert 10 * (0 + 1 + 2) == r.xlen("results")
    assert set() == pending_ids(r)


# -- failures ------------------------------------------------------------------------------


@stage(workers=2)
async def odd_only(entry: Entry) -> Entry:
    if int(entry.fields["n"]) % 2 == 0:
        raise ValueError(f"even: {entry.fields['n']}")
    return entry


@pytest.mark.parametrize("policy", ["skip", "collect"])
async def test_skipped_and_dead_lettered_items_are_acked(r, url, policy):
    """A failed item that is skipped, or collected and dead-lettered, has left the
    pipeline: its entry is acked like the others."""
    add_jobs(r, 20)
    letters: list[Failed[Entry]] = []
    work = odd_only.with_options(errors=policy, dead_letter=letters.append)
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with trio.fail_after(10):
        result = await Pipeline(work | RedisStreamSink(url, "results")).arun(source)
    assert set() == pending_ids(r)
    assert list(range(1, 20, 2)) == sorted(int(f["n"]) for _, f in r.xrange("results"))
    assert list(range(0, 20, 2)) == sorted(int(f.item.fields["n"]) for f in letters)
    assert (10 if policy == "collect" else 0) == len(result.errors)


async def test_a_fail_fast_failure_is_not_acked(r, url):
    """Under fail-fast the failed entry stays pending (to be delivered again), and no
    entry is lost: each is written, still pending, or not yet delivered."""
    ids = add_jobs(r, 20)

    @stage
    async def boom_at_5(entry: Entry) -> Entry:
        if entry.fields["n"] == "5":
            raise RuntimeError("boom")
        return entry

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with trio.fail_after(10), pytest.raises(StageError) as info:
        await Pipeline(boom_at_5 | RedisStreamSink(url, "results")).arun(source)
    assert "boom_at_5" == info.value.stage
    pending = pending_ids(r)
    assert ids[5] in pending
    (group,) = r.xinfo_groups("jobs")
    delivered = ids[: ids.index(group["last-delivered-id"]) + 1]
    written = set(source_ids(r))
    assert [] == [i for i in delivered if i not in pending and i not in written]


async def test_a_cancelled_consumer_acks_only_what_it_finished(r, url):
    """Cancelled mid-batch, a consumer acks exactly the entries it finished, and releases
    the others: another consumer takes them over at once, not claim_idle later."""
    ids = add_jobs(r, 10)

    @stage(workers=10)
    async def stuck_from_3(entry: Entry) -> Entry:
        if int(entry.fields["n"]) >= 3:
            await trio.sleep_forever()
        return entry

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    pipeline = Pipeline(stuck_from_3 | RedisStreamSink(url, "results"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.arun, source)
            await eventually(lambda: r.xlen("results") >= 3)
            nursery.cancel_scope.cancel()
    assert set(ids[3:]) == pending_ids(r)
    assert {"a": 7} == {c["name"]: c["pending"] for c in r.xpending("jobs", "workers")["consumers"]}

    other = RedisStreamSource(
        url, "jobs", group="workers", consumer="b", claim_idle=30.0, drain=True
    )
    with trio.fail_after(5):
        await Pipeline(square | RedisStreamSink(url, "results")).arun(other)
    assert sorted(ids) == sorted(set(source_ids(r)))
    assert set() == pending_ids(r)


async def test_a_restarted_consumer_takes_its_own_pending_entries_first(r, url):
    """A consumer that crashed holding entries, restarted under the same name, processes
    them at once (not claim_idle later), then the rest."""
    ids = add_jobs(r, 6)
    r.xgroup_create("jobs", "workers", "0")
    r.xreadgroup("workers", "a", {"jobs": ">"}, count=3)  # then it "crashes"
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)

    @stage  # one worker: outputs in the order the source gave them
    async def same(entry: Entry) -> Entry:
        return entry

    with trio.fail_after(5):
        result = await Pipeline(same).arun(source)
    assert ids == [entry.id for entry in result.outputs]
    assert set() == pending_ids(r)


@pytest.mark.parametrize("owner", ["a", "dead"])
async def test_pending_entries_deleted_from_the_stream_are_acked_away(r, url, owner):
    """An entry trimmed or deleted while pending (ours from before a restart, or a dead
    consumer's) has nothing left to process: it is cleared, the rest processed."""
    ids = add_jobs(r, 4)
    r.xgroup_create("jobs", "workers", "0")
    r.xreadgroup("workers", owner, {"jobs": ">"}, count=2)
    r.xdel("jobs", ids[0])
    source = RedisStreamSource(
        url, "jobs", group="workers", consumer="a", claim_idle=0.1, drain=True
    )
    with trio.fail_after(5):
        result = await Pipeline(square).arun(source)
    assert sorted(ids[1:]) == sorted(entry.id for entry in result.outputs)
    assert set() == pending_ids(r)


# -- backpressure and the fleet ------------------------------------------------------------


class RecordingSource(RedisStreamSource):
    """A source that remembers the capacity the runner gave it."""

    capacity = 0

    def __pipeflow_open__(self, *, capacity: int) -> Any:
        self.capacity = capacity
        return super().__pipeflow_open__(capacity=capacity)


async def test_a_consumer_holds_no_more_than_its_pipeline_can(r, url):
    """Backpressure crosses the network: however long the stream, the consumer never has
    more un-acked entries than the pipeline can hold."""
    add_jobs(r, 60)
    r.xgroup_create("jobs", "workers", "0")

    @stage(workers=2, buffer=1)
    async def slow(entry: Entry) -> Entry:
        await trio.sleep(0.01)
        return entry

    source = RecordingSource(url, "jobs", group="workers", consumer="a", drain=True)
    seen: list[int] = []

    async def watch() -> None:
        while True:
            info = await trio.to_thread.run_sync(r.xpending, "jobs", "workers")
            seen.append(info["pending"])
            await trio.sleep(0.005)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await Pipeline(slow | RedisStreamSink(url, "results", buffer=1)).arun(source)
            nursery.cancel_scope.cancel()
    assert source.capacity > 0
    assert source.capacity == max(seen)
    assert 60 == len(set(source_ids(r)))


async def test_a_dead_consumers_entries_are_reclaimed(r, url):
    """Entries a vanished consumer left pending are taken over after claim_idle."""
    ids = add_jobs(r, 5)
    r.xgroup_create("jobs", "workers", "0")
    r.xreadgroup("workers", "dead", {"jobs": ">"}, count=3)  # then it "crashes"
    source = RedisStreamSource(
        url, "jobs", group="workers", consumer="a", claim_idle=0.2, drain=True
    )
    with capture_logs() as logs, trio.fail_after(10):
        await Pipeline(square | RedisStreamSink(url, "results")).arun(source)
    assert sorted(ids) == sorted(source_ids(r))
    assert set() == pending_ids(r)
    claimed = [e for e in logs if e["event"] == "redis_entries_claimed"]
    assert 3 == sum(e["count"] for e in claimed)
    assert (5, 3, 0) == (
        source.statistics().acked,
        source.statistics().reclaimed,
        source.statistics().pending,
    )


async def test_a_slow_but_live_consumer_keeps_its_entries(r, url):
    """A consumer working on an entry for longer than claim_idle keeps it (its
    heartbeat), so a second consumer does not process it again."""
    add_jobs(r, 4)
    r.xgroup_create("jobs", "workers", "0")

    @stage(workers=4)
    async def slow(entry: Entry) -> Entry:
        await trio.sleep(1.0)
        return entry.with_fields(by="slow")

    def consumer(name: str) -> RedisStreamSource:
        return RedisStreamSource(
            url, "jobs", group="workers", consumer=name, claim_idle=0.3, drain=True
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Pipeline(slow | RedisStreamSink(url, "results")).arun, consumer("a"))
            await eventually(lambda: r.xpending("jobs", "workers")["pending"] == 4)
            await Pipeline(square | RedisStreamSink(url, "results")).arun(consumer("b"))
    assert ["slow"] * 4 == [f["by"] for _, f in r.xrange("results")]
    assert set() == pending_ids(r)


def start_member(
    redis_server: RedisServer,
    name: str,
    log: Path,
    *,
    query: str = "claim_idle=1&drain=1",
    options: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """One member of the fleet, started as a user would: the same CLI command each time."""
    query = f"stream=jobs&group=workers&consumer={name}&{query}"
    command = [sys.executable, "-m", "pipeflow", "run", "tests.fleet_app:pipeline", "-q", *options]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLEET_RESULTS_URL": redis_server.url,
        "FLEET_CONSUMER": name,
    }
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [*command, "--source", f"{redis_server.url}?{query}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def test_a_fleet_member_killed_mid_run_loses_nothing(r, redis_server, tmp_path):
    """Two processes share one stream; one is killed with SIGKILL mid-run; the other
    reclaims its entries and finishes: every entry processed, nothing pending."""
    ids = add_jobs(r, 400)
    a = start_member(redis_server, "a", tmp_path / "a.log")
    b = start_member(redis_server, "b", tmp_path / "b.log")

    def done_by_b() -> bool:
        assert b.poll() is None, (tmp_path / "b.log").read_text()
        return sum(1 for _, f in r.xrange("results") if f["by"] == "b") >= 20

    try:
        with trio.fail_after(30):
            await eventually(done_by_b)
            os.kill(b.pid, signal.SIGKILL)
            await eventually(lambda: a.poll() is not None)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert 0 == a.returncode, (tmp_path / "a.log").read_text()
    assert -signal.SIGKILL == b.returncode
    assert sorted(ids) == sorted(set(source_ids(r)))
    assert 400 <= r.xlen("results")  # at-least-once: b's unfinished ones, done again by a
    assert set() == pending_ids(r)
    assert 0 < sum(1 for _, f in r.xrange("results") if f["by"] == "b")


async def test_a_fleet_member_stopped_by_sigterm_acks_what_it_finished(r, redis_server, tmp_path):
    """SIGTERM (a deploy): the member stops reading, finishes what it holds within the
    grace period and acks it, so nothing it wrote is delivered again."""
    add_jobs(r, 400)
    member = start_member(redis_server, "m", tmp_path / "m.log")
    try:
        with trio.fail_after(30):
            await eventually(lambda: r.xlen("results") >= 20)
            member.send_signal(signal.SIGTERM)
            await eventually(lambda: member.poll() is not None)
    finally:
        if member.poll() is None:
            member.kill()
        member.wait()
    written = set(source_ids(r))
    assert 20 <= len(written) < 400
    assert set() == pending_ids(r) & written


# -- Redis going away ------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, to freeze (SIGSTOP) or crash."""
    with own_redis_server(tmp_path) as server:
        yield server


@pytest.mark.parametrize("signals", [1, 2])
async def test_ctrl_c_is_prompt_while_redis_is_frozen(own_server, tmp_path, signals):
    """Redis stops answering (SIGSTOP: a frozen server, a partition) mid-run: Ctrl+C on
    `pipeflow run --grace 1` still exits soon after the grace period (a prompt cancel,
    not a socket timeout), and a second Ctrl+C at once (with --grace 5: long before the
    grace period would end)."""
    with own_server.client() as client:
        add_jobs(client, 300)
        # With two signals, a grace period the test would notice being waited out.
        grace = "1" if signals == 1 else "5"
        member = start_member(
            own_server, "m", tmp_path / "m.log", query="block=0.1", options=("--grace", grace)
        )
        try:
            with trio.fail_after(30):
                await eventually(lambda: client.xlen("results") >= 20)
            assert own_server.proc is not None
            os.kill(own_server.proc.pid, signal.SIGSTOP)
            await trio.sleep(0.3)  # reads and writes now hang
            member.send_signal(signal.SIGINT)
            t0 = trio.current_time()
            if signals == 2:
                await trio.sleep(0.1)
                member.send_signal(signal.SIGINT)
                t0 = trio.current_time()
            with trio.move_on_after(10):
                await eventually(lambda: member.poll() is not None)
            elapsed = trio.current_time() - t0
        finally:
            if member.poll() is None:
                member.kill()
            member.wait()
    log = (tmp_path / "m.log").read_text()
    # Measured on a 2-core machine at load average 3-5: 1.07-1.30 s after one Ctrl+C
    # (--grace 1: the grace period, and the interpreter's exit), 0.06-0.32 s after a
    # second one; with Redis-bound waits it took 20 s. (The interpreter's own exit used
    # to add 0.3-0.7 s: the CLI now freezes the heap at exit.)
    assert elapsed < (2.0 if signals == 1 else 1.5), log
    assert 130 == member.returncode, log  # 128 + SIGINT, as a shell reports it
    assert "pipeflow: stopped by SIGINT" in log
    assert "Traceback" not in log


@pytest.fixture
def durable_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own with the append-only file, to crash and restart."""
    with own_redis_server(tmp_path, durable=True) as server:
        yield server


async def test_a_redis_restart_mid_run_is_survived(durable_server):
    """Redis (durable: AOF) crashes and comes back mid-run: the source and the sink
    reconnect with backoff, and the run finishes with nothing lost."""
    url = durable_server.url
    with durable_server.client() as client:
        ids = add_jobs(client, 300)

    @stage(workers=4)
    async def slowish(entry: Entry) -> Entry:
        await trio.sleep(0.005)
        return entry

    async def crash_and_restart() -> None:
        with durable_server.client() as watcher:
            await eventually(lambda: watcher.xlen("results") >= 50)
        await trio.to_thread.run_sync(durable_server.crash)
        await trio.sleep(0.5)
        await trio.to_thread.run_sync(durable_server.start)

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_and_restart)
            await Pipeline(slowish | RedisStreamSink(url, "results", workers=2)).arun(source)
    with durable_server.client() as client:
        assert sorted(ids) == sorted(set(source_ids(client)))
        assert set() == pending_ids(client)
    events = {e["event"] for e in logs}
    assert {"redis_unavailable", "redis_reconnected"} <= events
    assert 1 <= source.statistics().reconnects


async def test_redis_staying_down_fails_the_run_clearly():
    """If Redis does not come back within retry_for, the run fails with
    RedisUnavailable saying where and for how long (and no password)."""
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    source = RedisStreamSource(url, "jobs", group="workers", retry_for=0.3, drain=True)
    with capture_logs() as logs, trio.fail_after(10), pytest.raises(RedisUnavailable) as info:
        await Pipeline(square).arun(source)
    message = str(info.value)
    assert "did not answer for 0.3s" in message
    assert "during XGROUP CREATE on stream 'jobs'" in message
    assert "secret" not in message
    assert [] != [e for e in logs if e["event"] == "redis_unavailable"]


async def test_a_vanished_group_is_reported(r, url):
    """A group that disappears under a running source (Redis restarted without
    persistence, or XGROUP DESTROY) fails the run with ConsumerGroupLost."""
    add_jobs(r, 3)

    @stage
    async def destroy(entry: Entry) -> Entry:
        await trio.to_thread.run_sync(r.xgroup_destroy, "jobs", "workers")
        return entry

    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with trio.fail_after(10), pytest.raises(ConsumerGroupLost, match="consumer group is gone"):
        await Pipeline(destroy).arun(source)


# -- the sink, trimming, the URL form ------------------------------------------------------


async def test_the_sink_writes_mappings_entries_and_json(r, url):
    """A mapping becomes the fields, an Entry keeps its id as source_id, anything else is
    JSON in `data`; the sink's output is the new entry's id."""
    sink = RedisStreamSink(url, "out")
    items = [{"a": 1, "b": None}, Entry("1-0", {"x": "y"}), [1, "two", {"3": 4.5}]]
    with trio.fail_after(10):
        result = await Pipeline(sink).arun(items)
    entries = r.xrange("out")
    assert [e for e, _ in entries] == result.outputs
    assert [
        {"a": "1", "b": "None"},
        {"x": "y", "source_id": "1-0"},
        {"data": '[1, "two", {"3": 4.5}]'},
    ] == [f for _, f in entries]
    assert [1, "two", {"3": 4.5}] == Entry(*entries[2]).json()


async def test_a_batched_sink_appends_a_batch_per_round_trip(r, url):
    """With batch=N the sink appends lists of entries and outputs their ids; entries
    read from a stream are acked once their batch is written."""
    ids = add_jobs(r, 45)
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    sink = RedisStreamSink(url, "results", batch=20, batch_timeout=0.05)
    with trio.fail_after(10):
        result = await Pipeline(square | sink).arun(source)
    assert 45 == sum(len(batch) for batch in result.outputs)
    assert {i for batch in result.outputs for i in batch} == {e for e, _ in r.xrange("results")}
    assert sorted(ids) == sorted(source_ids(r))
    assert set() == pending_ids(r)


async def test_a_batched_sink_writes_every_kind_of_field_exactly(r, url):
    """The entries of a batch reach the stream as they are, whatever their fields: short
    ASCII (packed by the sink itself), long, non-ASCII, int and bytes values (packed by
    hiredis), mixed in one batch with mappings and an entry that has a source_id."""
    batches = [
        [Entry("1-0", {"n": "1", "square": "1"}), Entry("2-0", {"n": "2", "": ""})],
        [Entry("3-0", {"long": "x" * 5000}), Entry("4-0", {"n": "4"})],
        [Entry("5-0", {"é": "ünïcode ✓"}), Entry("6-0", {"n": 6, "b": b"bytes"})],
        [{"plain": 7}, Entry("8-0", {"n": "8", "source_id": "8-1"})],
    ]
    sink = RedisStreamSink(url, "results", batch=2, batch_timeout=0.05, ordered=True)
    with trio.fail_after(10):
        result = await Pipeline(sink).arun(item for batch in batches for item in batch)
    assert [i for batch in result.outputs for i in batch] == [e for e, _ in r.xrange("results")]
    assert [
        {"n": "1", "square": "1", "source_id": "1-0"},
        {"n": "2", "": "", "source_id": "2-0"},
        {"long": "x" * 5000, "source_id": "3-0"},
        {"n": "4", "source_id": "4-0"},
        {"é": "ünïcode ✓", "source_id": "5-0"},
        {"n": "6", "b": "bytes", "source_id": "6-0"},
        {"plain": "7"},
        {"n": "8", "source_id": "8-0"},  # (the entry's own id wins)
    ] == [f for _, f in r.xrange("results")]


async def test_a_sink_writes_entries_whose_field_names_keep_changing(r, url):
    """Field names the sink has not seen (here, every entry's own, 3,000 of them, more
    than a sink remembers) are written exactly, and a batch of them is packed in one more
    pass, not one more per new name (which made a batch of 1,000 new names take
    a quarter of a second, blocking the member: its heartbeat late, its entries claimed
    by other members and written twice)."""
    passes: list[int] = []  # per batch, how many times it was packed

    class CountingSink(RedisStreamSink):
        def _pack_entries(self, items):
            passes.append(0)
            return super()._pack_entries(items)

        def _pack_known(self, items, names):
            passes[-1] += 1
            return super()._pack_known(items, names)

    entries = [Entry(f"{i + 1}-0", {f"name{i}": str(i), "n": str(i)}) for i in range(3000)]
    sink = CountingSink(url, "results", batch=500, batch_timeout=0.05, ordered=True)
    with trio.fail_after(20):
        await Pipeline(sink).arun(entries)
    assert [{f"name{i}": str(i), "n": str(i), "source_id": f"{i + 1}-0"} for i in range(3000)] == [
        f for _, f in r.xrange("results")
    ]
    assert {2} == set(passes)  # every batch brought new names: learnt at once


def test_a_batched_sink_has_room_for_a_batch_in_front_of_it(url):
    """With batch=N and no buffer=, the sink's input buffer holds a whole batch (so the
    batcher takes its items in chunks); an explicit buffer= wins."""
    assert 100 == RedisStreamSink(url, "out", batch=100, workers=2).options.buffer
    assert 7 == RedisStreamSink(url, "out", batch=100, buffer=7).options.buffer
    assert RedisStreamSink(url, "out", workers=2).options.buffer is None


async def test_the_sink_rejects_what_it_cannot_write(r, url):
    """An item that is neither a mapping nor JSON fails with a message saying what to do."""
    with pytest.raises(StageError) as info:
        await Pipeline(RedisStreamSink(url, "out")).arun([{1, 2}])
    assert "not a mapping and not JSON-serialisable" in str(info.value.__cause__)
    assert "redis_stream_sink" == info.value.stage


async def test_the_sink_trims_its_stream(r, url):
    """maxlen caps the sink's stream (exactly, with approximate=False)."""
    sink = RedisStreamSink(url, "out", maxlen=10, approximate=False)
    with trio.fail_after(10):
        await Pipeline(sink).arun({"i": i} for i in range(30))
    assert [str(i) for i in range(20, 30)] == [f["i"] for _, f in r.xrange("out")]


async def test_the_source_trims_only_what_every_group_has_acked(r, url):
    """maxlen on the source trims acked entries only: a second group that has not read
    the stream yet keeps it whole."""
    add_jobs(r, 50)
    r.xgroup_create("jobs", "auditors", "0")
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True, maxlen=10)
    with trio.fail_after(10):
        await Pipeline(square).arun(source)
    assert 50 == r.xlen("jobs")
    r.xgroup_destroy("jobs", "auditors")
    add_jobs(r, 5)
    with trio.fail_after(10):
        await Pipeline(square).arun(source)
    assert 10 == r.xlen("jobs")
    assert ["45", "46", "47", "48", "49", "0", "1", "2", "3", "4"] == [
        f["n"] for _, f in r.xrange("jobs")
    ]


async def test_iterating_a_source_acks_each_entry_when_the_next_is_asked_for(r, url):
    """`async for entry in source` outside a pipeline: an entry is acked once the loop
    moves on, so the one being handled when the loop broke stays pending."""
    ids = add_jobs(r, 5)
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    seen: list[str] = []
    with trio.fail_after(10):
        async with contextlib.aclosing(source.__aiter__()) as entries:
            async for entry in entries:
                seen.append(entry.id)
                if len(seen) == 3:
                    break
    assert ids[:3] == seen
    assert {ids[2]} == pending_ids(r)


def test_from_url_reads_the_cli_form():
    """The --source URL carries stream, group and the options; the rest is redis-py's."""
    source = RedisStreamSource.from_url(
        "redis://:pw@127.0.0.1:6390/2?stream=jobs&group=workers&consumer=host-a"
        "&claim_idle=12.5&drain=1&count=50&maxlen=1000&socket_timeout=3"
    )
    assert ("jobs", "workers", "host-a") == (source.stream, source.group, source.consumer)
    assert (12.5, True, 50, 1000) == (source.claim_idle, source.drain, source.count, source.maxlen)
    assert "redis://:pw@127.0.0.1:6390/2?socket_timeout=3" == source.url
    assert "pw" not in repr(source)
    default = RedisStreamSource.from_url("redis://h/0?stream=s&group=g")
    assert (30.0, False) == (default.claim_idle, default.drain)
    # host-pid, with a -N suffix for the N-th source of this process
    assert re.fullmatch(rf".+-{os.getpid()}(-\d+)?", default.consumer)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?group=g", "lacks stream; use e.g. redis://"),
        ("redis://h/0", "lacks stream and group"),
        ("redis://h/0?stream=s&group=g&drain=maybe", "drain='maybe' in 'redis://h/0?"),
        ("http://h/0?stream=s&group=g", "must start with redis://, rediss:// or unix://"),
    ],
)
def test_from_url_says_what_is_wrong(url, message):
    """A bad --source URL fails with a message naming the problem."""
    with pytest.raises(ValueError, match=re.escape(message)):
        RedisStreamSource.from_url(url)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"claim_idle": 0}, ValueError, "claim_idle= must be a finite number > 0, got 0"),
        ({"block": "1"}, TypeError, "block= must be a number of seconds > 0, got '1'"),
        ({"count": 0}, ValueError, "count= must be an int >= 1 or None, got 0"),
        ({"drain": 1}, TypeError, "drain= must be True or False, got 1"),
        ({"group": ""}, TypeError, "group= must be a non-empty str, got ''"),
    ],
)
def test_source_options_are_checked(kwargs, error, message):
    """Wrong options fail when the source is made, naming the option and the value."""
    options = {"group": "g", **kwargs}
    with pytest.raises(error) as info:
        RedisStreamSource("redis://127.0.0.1/0", "jobs", **options)
    assert f"RedisStreamSource: {message}" == str(info.value)


def test_sink_options_are_checked():
    """The sink checks its own options and passes the stage's on."""
    with pytest.raises(ValueError, match=r"RedisStreamSink: maxlen= must be an int >= 1"):
        RedisStreamSink("redis://127.0.0.1/0", "out", maxlen=0)
    with pytest.raises(ValueError, match="workers"):
        RedisStreamSink("redis://127.0.0.1/0", "out", workers=0)
    assert 3 == RedisStreamSink("redis://127.0.0.1/0", "out", workers=3).options.max_workers


def test_entries_are_values():
    """Entries compare by value, hash by id, and with_fields keeps the id."""
    entry = Entry("5-1", {"a": "1"})
    assert Entry("5-1", {"a": "1"}) == entry
    assert Entry("5-1", {"b": "2", "c": "3"}) == entry.with_fields({"b": 2}, c=3)
    assert hash(Entry("5-1", {"z": "0"})) == hash(entry)
    assert Entry("5-1", {"a": "2"}) != entry
    assert Entry("5-2", {"a": "1"}) != entry
    assert ("5-1", {"a": "1"}) != entry
    assert Entry("5-1", {"n": "5", "square": "25"}) == entry.with_fields(n=5, square="25")
    assert Entry("5-1", {}) == Entry("5-1")
    assert "Entry(id='5-1', fields={'a': '1'})" == repr(entry)
    for name in ("id", "fields", "other"):
        with pytest.raises(AttributeError):
            setattr(entry, name, "x")
    assert entry == pickle.loads(pickle.dumps(entry)) == copy.deepcopy(entry)
    assert entry is weakref.ref(entry)()
    match entry:
        case Entry(entry_id, fields):
            assert ("5-1", {"a": "1"}) == (entry_id, fields)
    with pytest.raises(KeyError, match=r"entry 5-1 has no field 'data' \(its fields: \['a'\]\)"):
        entry.json()


async def test_a_dead_consumer_is_removed_once_its_entries_are_reclaimed(r, url):
    """A killed member's consumer stays in the group holding entries; a live member
    reclaims them, then removes the dead consumer (idle for 5 x claim_idle, nothing
    pending), and says so. A consumer that still holds entries is never removed."""
    ids = add_jobs(r, 5)
    r.xgroup_create("jobs", "workers", "0")
    r.xreadgroup("workers", "dead", {"jobs": ">"}, count=3)  # then it is killed
    r.xreadgroup("workers", "holder", {"jobs": ">"}, count=1)  # alive, its entry pending

    @stage
    async def same(entry: Entry) -> Entry:
        return entry

    source = RedisStreamSource(
        url, "jobs", group="workers", consumer="a", claim_idle=0.3, block=0.05, drain=False
    )

    def consumers() -> set[str]:
        return {c["name"] for c in r.xinfo_consumers("jobs", "workers")}

    def refresh_holder() -> None:
        """What a live member's heartbeat does for the entries it holds."""
        held = [
            p["message_id"] for p in r.xpending_range("jobs", "workers", "-", "+", 10, "holder")
        ]
        r.xclaim("jobs", "workers", "holder", 0, held, justid=True)

    async def holder_alive() -> None:
        while True:
            await trio.to_thread.run_sync(refresh_holder)
            await trio.sleep(0.02)

    with capture_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder_alive)
            nursery.start_soon(Pipeline(same).arun, source)
            await eventually(lambda: "dead" not in consumers())
            await trio.sleep(0.3)  # time for a wrong removal of "holder"
            assert {"a", "holder"} == consumers()
            nursery.cancel_scope.cancel()
    assert {ids[3]} == pending_ids(r)  # the holder's, untouched
    removed = [e for e in logs if e["event"] == "redis_consumer_removed"]
    assert ["dead"] == [e["removed"] for e in removed]
    assert removed[0]["idle"] >= 1.5  # 5 x claim_idle
