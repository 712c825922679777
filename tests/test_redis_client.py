"""The connector's own Redis client (Trio sockets, hiredis): TLS, Unix sockets,
AUTH/SELECT, and cancellation at any moment, against real redis-servers on 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pipeflow import Pipeline, stage
from pipeflow.testing import assert_nothing_left_running

redis = pytest.importorskip("redis", reason="the redis client is not installed")

from pipeflow.connectors._resp import (  # noqa: E402 - after the importorskip
    Client,
    RedisConnectionError,
    parse_url,
)
from pipeflow.connectors.redis import (  # noqa: E402
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
    own_redis_server,
    pending_ids,
)

pytestmark = pytest.mark.skipif(BINARY is None, reason="redis-server is not installed")


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[RedisServer]:
    with own_redis_server(tmp_path) as server:
        yield server


@stage(workers=2)
async def double(entry: Entry) -> Entry:
    return entry.with_fields(n=entry.fields["n"], double=2 * int(entry.fields["n"]))


async def round_trip(url: str, n: int = 20) -> list[Any]:
    """jobs -> double -> results through ``url``, draining; the run's outputs."""
    source = RedisStreamSource(url, "jobs", group="workers", consumer="a", drain=True)
    with trio.fail_after(10):
        result = await Pipeline(double | RedisStreamSink(url, "results")).arun(source)
    return result.outputs


async def test_tls(tmp_path):
    """rediss:// with the server's CA: entries go through; with no CA to trust, the
    connection is refused as unverified (and retried until retry_for)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    server = RedisServer(
        tmp_path,
        extra=(
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            str(tmp_path / "server.pem"),
            "--tls-key-file",
            str(tmp_path / "server.pem"),
            "--tls-ca-cert-file",
            str(tmp_path / "ca.pem"),
            "--tls-auth-clients",
            "no",
        ),
        client_options={"ssl": True, "ssl_ca_certs": str(tmp_path / "ca.pem")},
    )
    try:
        with server.client() as client:
            add_jobs(client, 20)
            url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
            outputs = await round_trip(url)
            assert 20 == len(outputs)
            assert 20 == client.xlen("results")
            assert set() == pending_ids(client)
        untrusted = f"rediss://127.0.0.1:{server.port}/0"
        source = RedisStreamSource(untrusted, "jobs", group="workers", retry_for=0.2)
        with (
            trio.fail_after(10),
            pytest.raises(RedisUnavailable, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            await Pipeline(double).arun(source)
    finally:
        server.stop()


async def test_unix_socket_password_and_database(tmp_path):
    """unix:// with a password and ?db=3: the entries are read from and written to
    database 3 of the server behind that socket."""
    sock = tmp_path / "redis.sock"
    server = RedisServer(
        tmp_path,
        extra=("--unixsocket", str(sock), "--requirepass", "s3cret"),
        client_options={"password": "s3cret", "db": 3},
    )
    try:
        with server.client() as client:
            add_jobs(client, 20)
            outputs = await round_trip(f"unix://:s3cret@{sock}?db=3")
            assert 20 == len(outputs)
            assert 20 == client.xlen("results")
            client.select(0)
            assert 0 == client.dbsize()
    finally:
        server.stop()


async def test_acl_user_and_a_wrong_password(plain):
    """redis://user:password@ logs in as that ACL user; a wrong password fails at once
    with Redis's answer, and never shows the password."""
    with plain.client() as client:
        client.acl_setuser("alice", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
        add_jobs(client, 5)
    good = f"redis://alice:pw@127.0.0.1:{plain.port}/0"
    assert 5 == len(await round_trip(good, 5))
    bad = f"redis://alice:nope@127.0.0.1:{plain.port}/0"
    source = RedisStreamSource(bad, "jobs", group="workers", drain=True)
    with trio.fail_after(5), pytest.raises(RedisError, match="refused AUTH: WRONGPASS") as info:
        await Pipeline(double).arun(source)
    assert "nope" not in str(info.value)


def test_urls_are_read_as_redis_py_reads_them():
    """Host, port, database, credentials and options, from each URL form."""
    p = parse_url("redis://u:p%40ss@example.com:6390/4?socket_timeout=2.5&client_name=x")
    assert ("example.com", 6390, 4, "u", "p@ss") == (p.host, p.port, p.db, p.username, p.password)
    assert (2.5, "x", False) == (p.socket_timeout, p.client_name, p.tls)
    assert 7 == parse_url("redis://h/4?db=7").db  # the query's db wins, as in redis-py
    assert ("/run/r.sock", 2) == (parse_url("unix:///run/r.sock?db=2").path, 2)
    tls = parse_url("rediss://h?ssl_cert_reqs=none&ssl_check_hostname=0")
    assert tls.tls
    assert not tls.ssl_context().check_hostname
    with pytest.raises(ValueError, match=r"unknown option 'sockettimeout'"):
        parse_url("redis://h/0?sockettimeout=1")
    with pytest.raises(ValueError, match=r"password=\*\*\* is not|socket_timeout='x'"):
        parse_url("redis://h/0?socket_timeout=x")


async def test_random_cancellations_never_mix_up_replies(plain):
    """Commands cancelled at random moments, some mid-reply (big replies): every reply
    that does come back is the one its command asked for, and nothing leaks."""
    client = Client(parse_url(plain.url))
    rng = random.Random(1234)
    big = "x" * 200_000  # several reads per reply: cancellations land mid-reply too
    await client.execute("SET", "big", big)
    try:
        with trio.fail_after(20):
            for i in range(300):
                with trio.move_on_after(rng.uniform(0, 0.002)):
                    if i % 3 == 0:
                        assert big == await client.execute("GET", "big")
                    else:
                        assert str(i) == await client.execute("ECHO", str(i))
            assert "PONG" == await client.execute("PING")
    finally:
        await client.aclose()
    assert_nothing_left_running()


async def test_every_client_sees_that_redis_keeps_a_command_waiting(plain):
    """`client.overdue`, which tells a cancelled run not to wait for its last acks, is
    shared by the clients of one Redis: while one client's command waits longer than
    Redis should take (frozen), another client (a source's, beside a sink's) sees it;
    it clears once a reply comes."""
    assert plain.proc is not None
    sink, source = Client(parse_url(plain.url)), Client(parse_url(plain.url))
    try:
        assert "PONG" == await source.execute("PING")
        assert not source.overdue
        os.kill(plain.proc.pid, signal.SIGSTOP)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink.execute, "PING")  # hangs
                await trio.sleep(0.1)
                assert not source.overdue  # not late yet
                await trio.sleep(0.3)
                assert source.overdue
                nursery.cancel_scope.cancel()
        assert source.overdue  # abandoned late: still overdue
        os.kill(plain.proc.pid, signal.SIGCONT)
        with trio.fail_after(5):
            assert "PONG" == await sink.execute("PING")
        assert not source.overdue
    finally:
        os.kill(plain.proc.pid, signal.SIGCONT)
        await sink.aclose()
        await source.aclose()


async def test_a_frozen_server_times_out_and_a_cancel_is_immediate(plain):
    """With Redis frozen (SIGSTOP), a command fails after socket_timeout, and one that
    is cancelled returns at once."""
    assert plain.proc is not None
    client = Client(parse_url(plain.url + "?socket_timeout=0.3"))
    try:
        assert "PONG" == await client.execute("PING")
        os.kill(plain.proc.pid, signal.SIGSTOP)
        with trio.fail_after(5):
            t0 = trio.current_time()
            with pytest.raises(RedisConnectionError, match=r"did not answer within 0\.3s"):
                await client.execute("PING")
            assert 0.3 <= trio.current_time() - t0 < 1.0
            t0 = trio.current_time()
            with trio.move_on_after(0.1):
                await client.execute("PING")
            assert trio.current_time() - t0 < 0.2
        os.kill(plain.proc.pid, signal.SIGCONT)
        with trio.fail_after(5):
            assert "PONG" == await client.execute("PING")
    finally:
        os.kill(plain.proc.pid, signal.SIGCONT)
        await client.aclose()
