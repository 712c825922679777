"""A fleet member's metrics: the source's counters, an endpoint other machines can
scrape, and a finished run's last figures kept for Prometheus (real redis-server,
real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeflow import Pipeline, stage

redis = pytest.importorskip("redis", reason="the redis client is not installed")

from pipeflow.connectors.redis import Entry, RedisStreamSource  # noqa: E402
from tests.redis_server import BINARY, RedisServer, add_jobs, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(BINARY is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis-metrics"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def r(server: RedisServer) -> Iterator[Any]:
    with server.client() as client:
        client.flushall()
        yield client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


SOURCE = (("pipeline", "fleet"), ("source", "jobs"))


async def test_the_source_metrics_count_acks_reclaims_and_pending(r, server):
    """pipeflow_source_* in the pipeline's registry: pending while entries are in the
    pipeline, then acked and reclaimed (a dead consumer's entries) once it is done;
    the counters add up over runs."""
    add_jobs(r, 10)
    r.xgroup_create("jobs", "workers", "0")
    r.xreadgroup("workers", "dead", {"jobs": ">"}, count=3)
    registry = CollectorRegistry()
    gate, entered = trio.Event(), trio.Event()

    @stage(workers=4)
    async def held(entry: Entry) -> Entry:
        entered.set()
        await gate.wait()
        return entry

    pipeline = Pipeline(held, name="fleet", registry=registry)

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, dict(SOURCE))

    source = RedisStreamSource(
        server.url, "jobs", group="workers", consumer="a", claim_idle=0.1, drain=True
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.arun, source)
            await entered.wait()
            assert 0 < value("pipeflow_source_pending")
            assert 0 == value("pipeflow_source_acked_total")
            gate.set()
    assert (10, 3, 0, 0) == (
        value("pipeflow_source_acked_total"),
        value("pipeflow_source_reclaimed_total"),
        value("pipeflow_source_reconnects_total"),
        value("pipeflow_source_pending"),
    )
    add_jobs(r, 5)
    again = RedisStreamSource(server.url, "jobs", group="workers", consumer="b", drain=True)
    with trio.fail_after(10):
        await pipeline.arun(again)
    assert 15 == value("pipeflow_source_acked_total")


def member(server: RedisServer, log: Path, *options: str) -> subprocess.Popen[bytes]:
    query = "stream=jobs&group=workers&consumer=m&drain=1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEET_RESULTS_URL": server.url}
    command = [sys.executable, "-m", "pipeflow", "run", "tests.fleet_app:pipeline", "-q"]
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [*command, "--source", f"{server.url}?{query}", *options],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def test_a_finished_members_last_figures_stay_up_for_metrics_linger(r, server, tmp_path):
    """`pipeflow run --metrics-host 0.0.0.0 --metrics-linger 30`: the endpoint listens
    on every interface, and after a draining run it keeps serving the final figures
    (every entry acked, nothing pending) until the linger ends or a signal comes."""
    add_jobs(r, 30)
    port = free_port()
    proc = member(
        server,
        tmp_path / "m.log",
        "--metrics-port",
        str(port),
        "--metrics-host",
        "0.0.0.0",
        "--metrics-linger",
        "30",
    )
    try:
        deadline = time.monotonic() + 30
        final: dict[Any, float] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "m.log").read_text()
            text = scrape(port)
            if text is not None:
                final = samples(text)
                if final.get(("pipeflow_source_acked_total", SOURCE)) == 30:
                    break
            time.sleep(0.05)
        assert 30 == final[("pipeflow_source_acked_total", SOURCE)]
        assert 0 == final[("pipeflow_source_pending", SOURCE)]
        assert 0 == r.xpending("jobs", "workers")["pending"]
        time.sleep(0.5)  # the run is over; the endpoint lingers
        assert proc.poll() is None
        assert scrape(port) is not None
        proc.send_signal(signal.SIGTERM)  # ends the linger at once
        assert 0 == proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = (tmp_path / "m.log").read_text()
    assert f"serving metrics at http://0.0.0.0:{port}/metrics" in log, log


def test_metrics_linger_needs_a_metrics_port(server, tmp_path):
    """--metrics-linger alone is a usage error that says what is missing."""
    proc = member(server, tmp_path / "m.log", "--metrics-linger", "5")
    assert 2 == proc.wait(timeout=30)
    assert "--metrics-linger needs --metrics-port" in (tmp_path / "m.log").read_text()
