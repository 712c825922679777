"""The Redis connector when Redis is gone, wrong or cut down: how long a member waits
(``retry_for``), what it says, what it counts, against real redis-servers on 127.0.0.1
(the real clock: each test is bounded by ``trio.fail_after``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from pipeflow import Pipeline, stage

redis = pytest.importorskip("redis", reason="the redis client is not installed")

from pipeflow.connectors.redis import (  # noqa: E402 - after the importorskip
    Entry,
    RedisError,
    RedisStreamSink,
    RedisStreamSource,
    RedisUnavailable,
)
from tests.redis_server import (  # noqa: E402
    BINARY,
    RedisServer,
    add_jobs,
    eventually,
    own_redis_server,
    pending_ids,
)

pytestmark = pytest.mark.skipif(BINARY is None, reason="redis-server is not installed")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, to crash or restart."""
    with own_redis_server(tmp_path, durable=True) as server:
        yield server


@stage(workers=2)
async def slowish(entry: Entry) -> Entry:
    await trio.sleep(0.005)
    return entry


async def test_rediss_to_a_redis_without_tls_fails_within_retry_for_and_says_why(server):
    """rediss:// to a plain Redis: the TLS handshake never gets an answer (Redis waits
    for the rest of what it takes for a command). The run fails after about retry_for,
    not after a whole connect timeout per attempt, saying the handshake got no answer
    and how long Redis did not answer."""
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=none"
    source = RedisStreamSource(url, "jobs", group="workers", retry_for=1.0, drain=True)
    t0 = trio.current_time()
    with trio.fail_after(10), pytest.raises(RedisUnavailable) as info:
        await Pipeline(slowish).arun(source)
    elapsed = trio.current_time() - t0
    message = str(info.value)
    assert elapsed < 2.5, message  # was 6-11 s: 5 s per connect attempt
    assert "the TLS handshake got no answer" in message
    assert "use redis://" in message
    assert "did not answer for 1.0s" in message or "did not answer for 1.1s" in message
    assert "retry_for=1" in message


async def test_a_member_whose_redis_is_gone_stops_within_retry_for_while_its_source_waits(server):
    """Redis dies for good while the source has nothing to send: the pipeline is full
    (its stage held back), so the source waits for room, its next heartbeat
    claim_idle / 3 away. Then the stage lets go, and the sink finds Redis gone and
    retries on its own, longer, retry_for. The source hears of the outage from the
    sink: the run fails with RedisUnavailable about the source's retry_for after
    that."""
    with server.client() as client:
        add_jobs(client, 500)
    source = RedisStreamSource(
        server.url, "jobs", group="workers", consumer="a", retry_for=1.0, claim_idle=60
    )
    sink = RedisStreamSink(server.url, "results", retry_for=60.0)
    gate = trio.Event()

    @stage(workers=4)
    async def held(entry: Entry) -> Entry:
        await gate.wait()
        return entry

    failures: list[RedisUnavailable] = []

    async def member() -> None:
        with pytest.raises(RedisUnavailable) as info:
            await Pipeline(held | sink).arun(source)
        failures.append(info.value)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member)
            await eventually(lambda: source.statistics().pending > 0)
            await trio.sleep(0.3)  # the source has filled the pipeline, and waits
            await trio.to_thread.run_sync(server.crash)
            gate.set()
            died = trio.current_time()
    elapsed = trio.current_time() - died
    # Measured: 1.0-1.2 s; it was 20 s (the heartbeat, claim_idle / 3 apart, first).
    assert elapsed < 2.5, str(failures[0])
    assert "retry_for=1" in str(failures[0])
    assert "redis_stream_sink" not in str(failures[0])


async def test_one_redis_restart_counts_one_reconnection(server):
    """Redis crashes and comes back while the source's reader and acker (and the sink)
    are all retrying: the source counts one reconnection, not one per retrying task,
    and nothing is lost."""
    with server.client() as client:
        ids = add_jobs(client, 600)

    async def crash_and_restart() -> None:
        with server.client() as watcher:
            await eventually(lambda: watcher.xlen("results") >= 100)
        await trio.to_thread.run_sync(server.crash)
        await trio.sleep(0.5)
        await trio.to_thread.run_sync(server.start)

    source = RedisStreamSource(server.url, "jobs", group="workers", consumer="a", drain=True)
    sink = RedisStreamSink(server.url, "results", workers=2)
    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_and_restart)
            await Pipeline(slowish | sink).arun(source)
    with server.client() as client:
        written = {fields["source_id"] for _, fields in client.xrange("results")}
        assert set(ids) == written
        assert set() == pending_ids(client)
    assert 1 == source.statistics().reconnects
    source_logs: list[dict[str, Any]] = [e for e in logs if e.get("consumer") == "a"]
    assert 1 == sum(e["event"] == "redis_reconnected" for e in source_logs)


# -- a Redis with commands disabled (rename-command X "", as managed services do) -------


@pytest.fixture
def cut_down(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start a server with the given commands renamed (to "" they are gone)."""
    servers: list[RedisServer] = []

    def start(**renamed: str) -> RedisServer:
        extra: list[str] = []
        for command, name in renamed.items():
            extra += ["--rename-command", command, name]
        server = RedisServer(tmp_path / str(len(servers)), extra=tuple(extra))
        servers.append(server)
        return server

    for n in range(3):
        (tmp_path / str(n)).mkdir()
    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def unavailable(logs: list[dict[str, Any]]) -> list[str]:
    return [e["command"] for e in logs if e["event"] == "redis_command_unavailable"]


async def test_without_client_and_xinfo_a_run_delivers_and_says_once_what_goes(cut_down):
    """CLIENT and XINFO disabled: the connector needs them only to name its connections,
    remove dead consumers and trim (maxlen=): every entry is still delivered and acked,
    and a warning says once per command what goes without it (here, the stream is not
    trimmed)."""
    server = cut_down(CLIENT="", XINFO="")
    with server.client() as client:
        ids = add_jobs(client, 30)
    source = RedisStreamSource(
        server.url, "jobs", group="workers", consumer="a", drain=True, maxlen=10
    )
    with capture_logs() as logs, trio.fail_after(20):
        result = await Pipeline(slowish | RedisStreamSink(server.url, "results")).arun(source)
    assert 30 == len(result.outputs)
    with server.client() as client:
        assert set(ids) == {fields["source_id"] for _, fields in client.xrange("results")}
        assert set() == pending_ids(client)
        assert 30 == client.xlen("jobs")  # not trimmed: that needs XINFO GROUPS
    assert ["CLIENT SETNAME", "XINFO CONSUMERS", "XINFO GROUPS"] == sorted(unavailable(logs))
    trim = next(e for e in logs if e.get("command") == "XINFO GROUPS")
    assert "the stream is not trimmed (maxlen=10)" == trim["consequence"]
    assert "unknown command 'XINFO'" in trim["error"]


async def test_a_command_needed_for_delivery_fails_the_run_naming_it(cut_down):
    """XAUTOCLAIM disabled (a source reclaims dead members' entries with it): the run
    fails at once with a RedisError that names the command and says why it may be
    missing."""
    server = cut_down(XAUTOCLAIM="")
    with server.client() as client:
        add_jobs(client, 5)
    source = RedisStreamSource(server.url, "jobs", group="workers", drain=True)
    with trio.fail_after(10), pytest.raises(RedisError) as info:
        await Pipeline(slowish).arun(source)
    message = str(info.value)
    assert "refused XAUTOCLAIM, which pipeflow needs" in message
    assert "disabled or renamed on this server" in message
    assert "unknown command 'XAUTOCLAIM'" in message


async def test_without_xgroup_a_group_made_beforehand_is_read(cut_down):
    """XGROUP renamed (only the admin may make groups): a group made beforehand is read
    as usual, with a warning that members cannot leave it; a group that does not exist
    fails the run with a message saying how to make it."""
    server = cut_down(XGROUP="xgroup-admin")
    with server.client() as client:
        ids = add_jobs(client, 20)
        client.execute_command("xgroup-admin", "CREATE", "jobs", "workers", "0")
    source = RedisStreamSource(server.url, "jobs", group="workers", consumer="a", drain=True)
    with capture_logs() as logs, trio.fail_after(20):
        result = await Pipeline(slowish).arun(source)
    assert sorted(ids) == sorted(entry.id for entry in result.outputs)
    with server.client() as client:
        assert set() == pending_ids(client)
    assert {"XGROUP CREATE", "XGROUP DELCONSUMER"} == set(unavailable(logs))

    other = RedisStreamSource(server.url, "jobs", group="others", drain=True)
    with trio.fail_after(10), pytest.raises(RedisError) as info:
        await Pipeline(slowish).arun(other)
    message = str(info.value)
    assert "stream 'jobs' has no consumer group 'others'" in message
    assert "XGROUP CREATE jobs others 0 MKSTREAM" in message


# -- two members under one consumer name ---------------------------------------------------


async def test_a_second_member_under_the_same_consumer_name_is_warned_about(server):
    """Two members given the same consumer= take each other's entries for their own (a
    restart's pending entries): a member that starts and finds its name active a moment
    ago says so (redis_consumer_in_use). One under a name of its own does not."""
    with server.client() as client:
        add_jobs(client, 300)

    @stage(workers=2)
    async def slow(entry: Entry) -> Entry:
        await trio.sleep(0.05)
        return entry

    def member(consumer: str) -> RedisStreamSource:
        return RedisStreamSource(server.url, "jobs", group="workers", consumer=consumer)

    first, twin, other = member("twin"), member("twin"), member("other")
    with capture_logs() as logs, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Pipeline(slow).arun, first)
            await eventually(lambda: first.statistics().pending > 0)
            nursery.start_soon(Pipeline(slow).arun, other)
            nursery.start_soon(Pipeline(slow).arun, twin)
            await eventually(lambda: twin.statistics().pending > 0)
            await eventually(lambda: other.statistics().pending > 0)
            nursery.cancel_scope.cancel()
    warnings = [e for e in logs if e["event"] == "redis_consumer_in_use"]
    assert warnings, [e["event"] for e in logs]
    assert {"twin"} == {e["consumer"] for e in warnings}
    assert "Give each member its own consumer=" in warnings[0]["hint"]
