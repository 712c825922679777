"""A fleet member's metrics: the source's counters, an endpoint other machines can
scrape, and a finished run's last figures kept for Prometheus (real redis-server,
real processes)."""

from __future__ import annotations

import os
import signal
import socket
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


#: A member written in Python: ``Pipeline.run(..., metrics_linger=30)``, then it says
#: how the run ended.
API_MEMBER = """
import sys
import pipeflow
from pipeflow.connectors.redis import RedisStreamSource
from tests.fleet_app import pipeline

url, port, drain = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
source = RedisStreamSource(url, "jobs", group="workers", consumer="m", drain=drain)
try:
    result = pipeline.run(source, collect=False, metrics_port=port, metrics_linger=30)
except pipeflow.Interrupted:
    print("interrupted", flush=True)
else:
    print("returned", result.stats["work"].items_in, flush=True)
"""


def api_member(server: RedisServer, port: int, *, drain: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEET_RESULTS_URL": server.url}
    return subprocess.Popen(
        [sys.executable, "-c", API_MEMBER, server.url, str(port), "1" if drain else "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_for_acked(proc: subprocess.Popen[str], port: int, acked: float) -> dict[Any, float]:
    deadline = time.monotonic() + 30
    figures: dict[Any, float] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None
        text = scrape(port)
        if text is not None:
            figures = samples(text)
            if figures.get(("pipeflow_source_acked_total", SOURCE)) == acked:
                return figures
        time.sleep(0.05)
    raise AssertionError(f"the endpoint never showed {acked} entries acked: {figures}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_pipeline_run_metrics_linger_serves_the_last_figures_until_a_signal(r, server, signum):
    """`Pipeline.run(source, metrics_port=P, metrics_linger=30)`: after a draining run
    the endpoint keeps serving its final figures; Ctrl+C or SIGTERM ends the linger
    within a second, and run() returns the run's result as it would have."""
    add_jobs(r, 20)
    port = free_port()
    proc = api_member(server, port, drain=True)
    try:
        final = wait_for_acked(proc, port, 20)
        assert 0 == final[("pipeflow_source_pending", SOURCE)]
        time.sleep(0.5)  # the run is over; the endpoint lingers
        assert proc.poll() is None
        assert scrape(port) is not None
        sent = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=10)
        assert time.monotonic() - sent < 1.0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert (0, "returned 20\n") == (proc.returncode, out)
    assert scrape(port) is None


def test_an_interrupted_run_does_not_linger(r, server):
    """A signal that stops the run itself (a member shut down) ends it as usual: no
    linger, the endpoint goes with the run."""
    add_jobs(r, 5)
    port = free_port()
    proc = api_member(server, port, drain=False)  # waits for new entries for ever
    try:
        wait_for_acked(proc, port, 5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert time.monotonic() - sent < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert "interrupted\n" == out
    assert scrape(port) is None


async def test_arun_metrics_linger_keeps_the_endpoint_for_that_long():
    """`await pipeline.arun(items, metrics_port=0, metrics_linger=S)` returns S seconds
    after the run ended, its endpoint serving the final figures meanwhile."""

    @stage(workers=2)
    async def double(x: int) -> int:
        return 2 * x

    pipeline = Pipeline(double, name="linger")
    ended_at = returned_at = 0.0
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal returned_at
                result = await pipeline.arun(range(50), metrics_port=0, metrics_linger=1.0)
                returned_at = time.monotonic()
                assert list(range(0, 100, 2)) == sorted(result.outputs)

            nursery.start_soon(run)
            # Polled: the run's end and the linger's start signal no event to wait on.
            while pipeline.metrics_address is None or pipeline.current_stats() is not None:  # noqa: ASYNC110
                await trio.sleep(0.01)  # until the run is over and the linger serves
            ended_at = time.monotonic()
            port = pipeline.metrics_address[1]
            text = await trio.to_thread.run_sync(scrape, port)
    assert text is not None
    figures = samples(text)
    items = (
        "pipeflow_stage_items_total",
        (("outcome", "ok"), ("pipeline", "linger"), ("stage", "double")),
    )
    assert 50 == figures[items]
    assert 0.8 < returned_at - ended_at < 2.0
    assert pipeline.metrics_address is None


class _Knocker(trio.abc.Instrument):
    """Connects to the metrics port (and asks for /metrics) after every task step from
    the moment the run's endpoint is gone (``metrics_address`` None) until the linger's
    is up: the connections a scraper would make in between."""

    def __init__(self, pipeline: Pipeline[Any, Any]) -> None:
        self.pipeline = pipeline
        self.port: int | None = None
        self.phase = "run"  # then "between", then "linger"
        self.refused = 0
        self.knocks: list[socket.socket] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        address = self.pipeline.metrics_address
        if self.phase == "run":
            if address is not None:
                self.port = address[1]
            elif self.port is not None:
                self.phase = "between"
        elif self.phase == "between" and address is not None:
            self.phase = "linger"
        if self.phase != "between":
            return
        assert self.port is not None
        try:
            knock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except ConnectionRefusedError:
            self.refused += 1
        else:
            knock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.knocks.append(knock)


def _read_all(sock: socket.socket) -> bytes:
    with sock:
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_the_port_keeps_listening_from_the_run_to_its_linger():
    """A connection made at any task step between the run's end and its linger's start
    is not refused, and is answered with the final figures: the run's endpoint hands its
    listening socket to the linger (the port was closed, then opened anew, before)."""

    @stage(workers=2)
    async def double(x: int) -> int:
        return 2 * x

    pipeline = Pipeline(double, name="handoff")
    knocker = _Knocker(pipeline)
    trio.lowlevel.add_instrument(knocker)
    try:
        with trio.fail_after(20):
            await pipeline.arun(range(50), metrics_port=0, metrics_linger=0.3)
    finally:
        trio.lowlevel.remove_instrument(knocker)
    assert "linger" == knocker.phase
    assert 0 == knocker.refused
    assert knocker.knocks  # there were steps in between
    answers = [await trio.to_thread.run_sync(_read_all, k) for k in knocker.knocks]
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        figures = samples(answer.partition(b"\r\n\r\n")[2].decode())
        key = (
            "pipeflow_stage_items_total",
            (("outcome", "ok"), ("pipeline", "handoff"), ("stage", "double")),
        )
        assert 50 == figures[key]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"metrics_port": 0, "metrics_linger": -1},
            ValueError,
            "metrics_linger= must be a finite number of seconds >= 0, got -1",
        ),
        (
            {"metrics_port": 0, "metrics_linger": "30"},
            TypeError,
            "metrics_linger= must be a number of seconds >= 0, got '30'",
        ),
        ({"metrics_linger": 5}, ValueError, "metrics_linger=5 needs metrics_port="),
    ],
)
async def test_metrics_linger_is_checked_before_the_run(kwargs, error, message):
    """A bad metrics_linger= fails before any item moves, naming the option and value."""
    seen = []

    @stage
    async def note(x: int) -> int:
        seen.append(x)
        return x

    with pytest.raises(error) as info:
        await Pipeline(note, name="p").arun([1, 2], **kwargs)
    assert f"pipeline 'p': {message}" in str(info.value)
    assert [] == seen
