"""Prometheus metrics: samples read from a fresh CollectorRegistry, live gauges, and the
metrics_port HTTP endpoint scraped over 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from pipeflow import CircuitBreaker, Pipeline, Retry, stage

METRICS = {
    "pipeflow_stage_inflight": "gauge",
    "pipeflow_stage_queue_depth": "gauge",
    "pipeflow_stage_workers": "gauge",
    "pipeflow_stage_workers_busy": "gauge",
    "pipeflow_stage_items": "counter",
    "pipeflow_stage_duration_seconds": "histogram",
    "pipeflow_stage_queue_wait_seconds": "histogram",
    "pipeflow_stage_blocked_seconds": "counter",
    "pipeflow_stage_throttled_seconds": "counter",  # beyond the contract's table
    "pipeflow_stage_oldest_inflight_seconds": "gauge",
    "pipeflow_stage_stalled_workers": "gauge",
    "pipeflow_stage_breaker_state": "gauge",
}
# pipeflow_stage_stall_after_seconds is served only while a run is live (test_stalls.py).
BUCKETS = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5"]
BUCKETS += ["1.0", "2.5", "5.0", "10.0", "+Inf"]


@stage(workers=2)
async def sleepy(x):
    """0.25 s per item (exact under autojump_clock)."""
    await trio.sleep(0.25)
    return x


@stage
async def odd_only(x):
    if x % 2:
        yield x


def value(registry, name, stage, pipeline="p", **labels):
    return registry.get_sample_value(name, {"pipeline": pipeline, "stage": stage, **labels})


def items(registry, stage, pipeline="p"):
    outcomes = ("ok", "failed", "retried", "dropped", "filtered")
    return {
        o: value(registry, "pipeflow_stage_items_total", stage, pipeline, outcome=o)
        for o in outcomes
    }


def test_exactly_the_contract_metrics_with_pipeline_and_stage_labels():
    """A registered pipeline exposes the contract's metric families, every sample
    labelled pipeline and stage, at zero before any run; the breaker gauge appears only
    for stages with a breaker."""
    registry = CollectorRegistry()
    Pipeline(sleepy | odd_only, name="p", registry=registry)
    families = {m.name: m for m in registry.collect()}
    contract = {k: v for k, v in METRICS.items() if k != "pipeflow_stage_breaker_state"}
    assert contract == {name: m.type for name, m in families.items()}
    for family in families.values():
        assert {"sleepy", "odd_only"} == {s.labels["stage"] for s in family.samples}
        assert {"p"} == {s.labels["pipeline"] for s in family.samples}
    assert {o: 0.0 for o in ("ok", "failed", "retried", "dropped", "filtered")} == items(
        registry, "sleepy"
    )
    guarded = sleepy.with_options(breaker=CircuitBreaker())
    Pipeline(guarded | odd_only, name="q", registry=registry)
    families = {m.name: m for m in registry.collect()}
    assert METRICS == {name: m.type for name, m in families.items()}
    assert [("q", "sleepy", 0.0)] == [
        (s.labels["pipeline"], s.labels["stage"], s.value)
        for s in families["pipeflow_stage_breaker_state"].samples
    ]


async def test_counts_and_histograms_after_a_run(autojump_clock):
    """Outcome counters, duration and queue-wait histograms (1 ms .. 10 s buckets) and
    blocked time match what the run did, exactly."""
    registry = CollectorRegistry()
    result = await Pipeline(sleepy | odd_only, name="p", registry=registry).arun(range(4))
    assert [1, 3] == sorted(result.outputs)
    assert {"ok": 4.0, "failed": 0.0, "retried": 0.0, "dropped": 0.0, "filtered": 0.0} == items(
        registry, "sleepy"
    )
    assert {"ok": 2.0, "failed": 0.0, "retried": 0.0, "dropped": 0.0, "filtered": 2.0} == items(
        registry, "odd_only"
    )
    # Every item took 0.25 s in sleepy: nothing below the 0.25 bucket, all 4 from it.
    buckets = [
        value(registry, "pipeflow_stage_duration_seconds_bucket", "sleepy", le=le) for le in BUCKETS
    ]
    assert [0.0] * 7 + [4.0] * 7 == buckets
    assert 4.0 == value(registry, "pipeflow_stage_duration_seconds_count", "sleepy")
    assert 1.0 == value(registry, "pipeflow_stage_duration_seconds_sum", "sleepy")
    # The two workers take items 0 and 1 at once; 2 and 3 wait in the buffer for 0.25 s.
    waits = [
        value(registry, "pipeflow_stage_queue_wait_seconds_bucket", "sleepy", le=le)
        for le in BUCKETS
    ]
    assert [2.0] * 7 + [4.0] * 7 == waits
    assert 0.5 == value(registry, "pipeflow_stage_queue_wait_seconds_sum", "sleepy")
    # odd_only keeps up: sleepy never waits to hand an item over.
    assert 0.0 == value(registry, "pipeflow_stage_blocked_seconds_total", "sleepy")


async def test_failures_retries_and_blocked_time_are_counted(autojump_clock):
    """failed and retried outcomes, and seconds blocked behind a slower stage."""
    registry = CollectorRegistry()

    @stage(errors="skip", retries=Retry(attempts=2, backoff=0.0))
    async def flaky(x):
        if x == 3:
            raise ValueError(x)
        return x

    @stage
    async def slow(x):
        await trio.sleep(1.0)
        return x

    pipeline = Pipeline(flaky | slow, name="p", registry=registry)
    await pipeline.arun(range(5))
    assert {"ok": 4.0, "failed": 1.0, "retried": 2.0, "dropped": 0.0, "filtered": 0.0} == items(
        registry, "flaky"
    )
    # flaky hands 4 items to a 1-worker stage with a buffer of 1: the first goes
    # straight to slow's worker, the second waits in the buffer, the third waits 1 s to
    # be handed over, the fourth 1 s more.
    assert 2.0 == value(registry, "pipeflow_stage_blocked_seconds_total", "flaky")


async def test_counters_only_go_up_across_runs(autojump_clock):
    """A second run adds to the first one's counters and histograms."""
    registry = CollectorRegistry()
    pipeline = Pipeline(sleepy, name="p", registry=registry)
    await pipeline.arun(range(4))
    assert 4.0 == items(registry, "sleepy")["ok"]
    await pipeline.arun(range(6))
    assert 10.0 == items(registry, "sleepy")["ok"]
    assert 10.0 == value(registry, "pipeflow_stage_duration_seconds_count", "sleepy")
    assert 2.5 == value(registry, "pipeflow_stage_duration_seconds_sum", "sleepy")


async def test_live_gauges_during_a_run(autojump_clock):
    """Inside stream(): workers, busy workers, in-flight items and queue depth are the
    live values; after the run the gauges fall to zero and the counters keep the total."""
    registry = CollectorRegistry()
    release = trio.Event()

    @stage(workers=3, buffer=4)
    async def held(x):
        await release.wait()
        return x

    pipeline = Pipeline(held, name="p", registry=registry)
    async with pipeline.stream(range(20)) as outputs:
        await trio.testing.wait_all_tasks_blocked()
        live = {
            name: value(registry, f"pipeflow_stage_{name}", "held")
            for name in ("workers", "workers_busy", "inflight", "queue_depth")
        }
        assert {"workers": 3.0, "workers_busy": 3.0, "inflight": 3.0, "queue_depth": 4.0} == live
        assert 0.0 == items(registry, "held")["ok"]
        release.set()
        assert 20 == len([x async for x in outputs])
    for name in ("workers", "workers_busy", "inflight", "queue_depth"):
        assert 0.0 == value(registry, f"pipeflow_stage_{name}", "held")
    assert 20.0 == items(registry, "held")["ok"]


async def test_dropped_items_at_the_entry_are_counted(autojump_clock):
    """flow.offer() on a full pipeline drops the item: outcome="dropped"."""
    registry = CollectorRegistry()
    release = trio.Event()

    @stage(buffer=1)
    async def gate(x):
        await release.wait()
        return x

    pipeline = Pipeline(gate, name="p", registry=registry)
    async with pipeline.open() as flow:
        await flow.send(1)  # taken by the worker
        await flow.send(2)  # waits in the buffer
        await trio.testing.wait_all_tasks_blocked()
        assert [False, False] == [flow.offer(3), flow.offer(4)]
        assert 2.0 == items(registry, "gate")["dropped"]
        release.set()
    assert {"ok": 2.0, "failed": 0.0, "retried": 0.0, "dropped": 2.0, "filtered": 0.0} == items(
        registry, "gate"
    )


async def test_breaker_state_gauge(autojump_clock):
    """pipeflow_stage_breaker_state is 2 while the breaker is open, 0 once closed."""
    registry = CollectorRegistry()
    healthy = False
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10.0)

    @stage(breaker=breaker, errors="skip")
    async def remote(x):
        if not healthy:
            raise ConnectionError(x)
        return x

    pipeline = Pipeline(remote, name="p", registry=registry)
    assert 0.0 == value(registry, "pipeflow_stage_breaker_state", "remote")
    async with pipeline.open() as flow:
        await flow.send(1)
        await flow.send(2)
        await trio.testing.wait_all_tasks_blocked()
        assert 2.0 == value(registry, "pipeflow_stage_breaker_state", "remote")
        healthy = True
        await flow.send(3)  # held until the cooldown ends, then probes and closes
    assert 0.0 == value(registry, "pipeflow_stage_breaker_state", "remote")


def test_two_pipelines_with_the_same_stage_names_share_a_registry():
    """Pipelines with different names are told apart by their pipeline label."""
    registry = CollectorRegistry()
    Pipeline(odd_only, name="a", registry=registry).run(range(4))
    Pipeline(odd_only, name="b", registry=registry).run(range(6))
    assert 2.0 == items(registry, "odd_only", pipeline="a")["ok"]
    assert 3.0 == items(registry, "odd_only", pipeline="b")["ok"]
    exposition = [m.name for m in registry.collect()]
    assert len(set(exposition)) == len(exposition)  # each family once


def test_two_pipelines_with_the_same_name_in_one_registry_is_an_error():
    """The second pipeline of the same name in a registry raises a clear ValueError."""
    registry = CollectorRegistry()
    Pipeline(sleepy, name="etl", registry=registry)
    with pytest.raises(ValueError, match="pipeline") as info:
        Pipeline(odd_only, name="etl", registry=registry)
    assert (
        "a pipeline named 'etl' is already registered in this CollectorRegistry; its "
        "metrics are labelled pipeline='etl', so give each pipeline its own name "
        "(Pipeline(..., name=...)) or its own registry"
    ) == str(info.value)
    Pipeline(odd_only, name="etl", registry=CollectorRegistry())  # another registry: fine


def test_registry_must_be_a_collector_registry():
    """registry= given something else says what it got."""
    with pytest.raises(TypeError) as info:
        Pipeline(sleepy, name="p", registry={})
    assert (
        "pipeline 'p': registry= must be a prometheus_client.CollectorRegistry, got {} (dict)"
        == str(info.value)
    )


def test_metric_names_clash_with_another_collector():
    """A registry that already has a pipeflow_* metric of its own refuses the pipeline,
    rather than exposing the name twice."""
    registry = CollectorRegistry()
    Gauge("pipeflow_stage_inflight", "mine", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Pipeline(sleepy, name="p", registry=registry)


# -- the HTTP endpoint (real sockets on 127.0.0.1, real clock) -----------------------------


def url(pipeline):
    host, port = pipeline.metrics_address
    return f"http://{host}:{port}/metrics"


def parse(text):
    return {
        (s.name, s.labels.get("stage"), s.labels.get("outcome")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_port_serves_metrics_during_the_run_and_closes_after():
    """metrics_port=0 picks a free port, published as pipeline.metrics_address; a
    scrape during the run shows the live run; afterwards the socket is closed."""
    release = trio.Event()

    @stage(workers=2)
    async def held(x):
        await release.wait()
        return x

    pipeline = Pipeline(held, name="p")
    with trio.fail_after(10):
        async with pipeline.stream(range(5), metrics_port=0) as outputs:
            host, port = pipeline.metrics_address
            assert ("127.0.0.1", True) == (host, port > 0)
            await trio.testing.wait_all_tasks_blocked()
            async with httpx.AsyncClient() as client:
                response = await client.get(url(pipeline))
            assert 200 == response.status_code
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            samples = parse(response.text)
            assert 2.0 == samples["pipeflow_stage_workers_busy", "held", None]
            assert 0.0 == samples["pipeflow_stage_items_total", "held", "ok"]
            release.set()
            assert 5 == len([x async for x in outputs])
        assert pipeline.metrics_address is None
        # The run created a private registry for its metrics, and kept the totals.
        assert 5.0 == items(pipeline.registry, "held")["ok"]
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://{host}:{port}/metrics")


async def test_metrics_port_uses_the_pipelines_registry():
    """With registry= given, the endpoint serves that registry, the application's own
    metrics included."""
    registry = CollectorRegistry()
    Gauge("app_ready", "the application's own metric", registry=registry).set(1)
    seen = {}

    @stage
    async def scrape(x):
        async with httpx.AsyncClient() as client:
            seen.update(parse((await client.get(url(pipeline))).text))
        return x

    pipeline = Pipeline(odd_only | scrape, name="p", registry=registry)
    with trio.fail_after(10):
        await pipeline.arun([1], metrics_port=0)
    assert registry is pipeline.registry
    assert 1.0 == seen["app_ready", None, None]
    assert 1.0 == seen["pipeflow_stage_items_total", "odd_only", "ok"]
    assert 1.0 == seen["pipeflow_stage_inflight", "scrape", None]


async def test_the_endpoint_answers_other_paths_and_methods():
    """HEAD gives headers only; / is the dashboard; other paths 404; other methods 405."""
    release = trio.Event()

    @stage
    async def held(x):
        await release.wait()
        return x

    pipeline = Pipeline(held, name="p")
    with trio.fail_after(10):
        async with pipeline.open(metrics_port=0) as flow:
            await flow.send(1)
            base = url(pipeline).removesuffix("/metrics")
            async with httpx.AsyncClient() as client:
                head = await client.head(f"{base}/metrics")
                missing = await client.get(f"{base}/nowhere")
                page = await client.get(f"{base}/")
                post = await client.post(f"{base}/metrics")
            release.set()
    assert (200, b"", True) == (
        head.status_code,
        head.content,
        int(head.headers["content-length"]) > 0,
    )
    assert (
        404,
        "pipeflow serves its metrics at /metrics, a dashboard at / and its workers at /workers\n",
    ) == (
        missing.status_code,
        missing.text,
    )
    assert (200, "text/html; charset=utf-8") == (page.status_code, page.headers["content-type"])
    assert (405, "GET, HEAD") == (post.status_code, post.headers["allow"])


async def test_a_client_that_hangs_up_does_not_disturb_the_run():
    """A half-sent request or a reset connection is the client's problem, not the
    pipeline's: the run finishes normally."""
    release = trio.Event()

    @stage
    async def held(x):
        await release.wait()
        return x

    pipeline = Pipeline(held, name="p")
    with trio.fail_after(10):
        async with pipeline.open(metrics_port=0) as flow:
            await flow.send(1)
            host, port = pipeline.metrics_address
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /metr")
            await stream.aclose()
            raw = socket.create_connection((host, port))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            raw.close()  # RST instead of FIN
            async with httpx.AsyncClient() as client:
                assert 200 == (await client.get(url(pipeline))).status_code
            release.set()
    assert 1 == flow.result.stats["held"].ok


async def test_a_port_in_use_fails_the_run_with_a_clear_error():
    """A busy port raises OSError naming the pipeline and the address, before any item
    is taken."""
    taken = trio.socket.socket()
    with taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        seen = []

        @stage
        async def record(x):
            seen.append(x)
            return x

        with pytest.raises(
            OSError, match=f"pipeline 'p': cannot serve metrics on 127.0.0.1:{port}: "
        ):
            await Pipeline(record, name="p").arun(range(3), metrics_port=port)
        assert [] == seen


@pytest.mark.parametrize(
    ("port", "error"),
    [(-1, ValueError), (70000, ValueError), ("9100", TypeError), (True, TypeError)],
)
def test_bad_metrics_port(port, error):
    """metrics_port= must be an int in 0..65535."""
    with pytest.raises(error) as info:
        Pipeline(sleepy, name="p").run([1], metrics_port=port)
    assert (
        f"pipeline 'p': metrics_port= must be an int from 0 to 65535 (0 picks a free port), got {port!r}"
        == str(info.value)
    )


async def test_throttled_seconds_are_exported(autojump_clock):
    """Waiting for a rate-limit token is exported as throttled time, not busy time."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()

    @stage(workers=4, rate=10)
    async def limited(x):
        return x

    await Pipeline(limited, name="throttle", registry=registry).arun(range(5))
    # Calls start at 0, 0.1, 0.2, 0.3, 0.4: the waits add up to 1.0 s.
    assert 1.0 == pytest.approx(
        registry.get_sample_value(
            "pipeflow_stage_throttled_seconds_total", {"pipeline": "throttle", "stage": "limited"}
        )
    )


async def test_oldest_inflight_shows_a_stall_growing(autojump_clock):
    """An item stuck in a worker: pipeflow_stage_oldest_inflight_seconds (and the live
    StageStats) show its age, growing; 0 once no item is in a worker."""
    from prometheus_client import CollectorRegistry

    gate = trio.Event()

    @stage(workers=2)
    async def stuck(x):
        if x == 1:
            await gate.wait()
        return x

    registry = CollectorRegistry()
    pipeline = Pipeline(stuck, name="p", registry=registry)
    labels = {"pipeline": "p", "stage": "stuck"}
    seen = []
    async with pipeline.open() as flow:
        await flow.send(0)
        await flow.send(1)
        for _ in range(2):
            await trio.sleep(3)
            seen.append(registry.get_sample_value("pipeflow_stage_oldest_inflight_seconds", labels))
        seen.append(flow.stats()["stuck"].oldest_inflight_seconds)
        gate.set()
    assert [3.0, 6.0, 6.0] == seen
    assert 0.0 == flow.result.stats["stuck"].oldest_inflight_seconds
    assert 0.0 == registry.get_sample_value("pipeflow_stage_oldest_inflight_seconds", labels)


_OUT_OF_FDS = """import json, os, resource, sys
import trio
from structlog.testing import capture_logs
from pipeflow import Pipeline, stage

@stage
async def slow(x):
    await trio.sleep(1.0)
    return x

pipeline = Pipeline(slow, name="fds")

async def main():
    async def limit_when_listening():
        while pipeline.metrics_address is None:
            await trio.sleep(0.01)
        # Room for one more descriptor: the first connection is accepted, then none.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 2, hard))
        print(pipeline.metrics_address[1], flush=True)

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limit_when_listening)
            result = await pipeline.arun([1], metrics_port=0)
    print(json.dumps({"outputs": result.outputs, "events": [
        {k: v for k, v in e.items() if k in ("event", "error", "retry_every")} for e in logs]}), flush=True)

trio.run(main)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_an_endpoint_out_of_file_descriptors_says_so_once_and_the_run_goes_on(tmp_path):
    """A process at its limit of open files: the endpoint cannot accept scrapes. It
    logs `metrics_accept_failed` once (not every 0.1 s as it retries), and the run
    finishes as usual. (A real process, its RLIMIT_NOFILE lowered once it listens, and
    real connections from this one.)"""
    script = tmp_path / "out_of_fds.py"
    script.write_text(_OUT_OF_FDS)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        out = proc.stdout.read()
        assert 0 == proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for client in clients:
        client.close()
    report = json.loads(out)
    assert [1] == report["outputs"]
    assert [
        {"event": "run_started"},
        {"event": "metrics_accept_failed", "error": "Too many open files", "retry_every": 0.1},
        {"event": "run_finished"},
    ] == report["events"]
