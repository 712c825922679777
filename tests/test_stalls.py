"""Stall forensics: ``stall_after=``, the ``stage_stalled`` / ``stage_unstalled`` events,
and what each worker is doing now (``Pipeline.current_workers()``), on Trio's mock clock."""

from __future__ import annotations

import pytest
import structlog
import trio
from structlog.testing import capture_logs

from pipeflow import Pipeline, Retry, stage
from pipeflow.testing import assert_nothing_left_running


@pytest.fixture(autouse=True)
def _structlog_defaults():
    """Each test starts and ends with an unconfigured structlog, as a fresh program has."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _stall_events(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] in ("stage_stalled", "stage_unstalled")]


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_stall_after_must_be_positive_seconds(value):
    """A bad stall_after= fails at decoration time, naming stage, option and value."""
    with pytest.raises(ValueError, match=r"stage 'f': option stall_after= must be .*got"):

        @stage(stall_after=value)
        async def f(x):
            return x


def test_stall_after_must_be_a_number():
    """stall_after="5s" is a TypeError naming the stage, the option and the value."""
    with pytest.raises(TypeError, match=r"stage 'f': option stall_after= .*got '5s'"):

        @stage(stall_after="5s")
        async def f(x):
            return x


async def test_a_stalled_item_is_logged_once_then_its_end(autojump_clock):
    """An item 42 s in a worker of a stage with stall_after=5: stage_stalled at exactly
    5 s (once, not every tick), then stage_unstalled with its 42 s when it leaves."""

    @stage(stall_after=5)
    async def fetch(x):
        await trio.sleep(42 if x == "slow" else 1)
        return x

    with capture_logs() as logs:
        result = await Pipeline(fetch, name="p").arun(["a", "slow", "b"])
    assert ["a", "slow", "b"] == result.outputs
    events = _stall_events(logs)
    assert [
        {
            "event": "stage_stalled",
            "log_level": "warning",
            "pipeline": "p",
            "stage": "fetch",
            "worker": 0,
            "item": "'slow'",
            "seconds": 5.0,
            "stall_after": 5.0,
        },
        {
            "event": "stage_unstalled",
            "log_level": "info",
            "pipeline": "p",
            "stage": "fetch",
            "worker": 0,
            "item": "'slow'",
            "seconds": 42.0,
            "outcome": "finished",
        },
    ] == events
    assert 44.0 == result.elapsed
    assert_nothing_left_running()


@pytest.mark.timeout(20)  # the spin stopped the mock clock: no Trio timeout could fire
async def test_an_item_reaching_its_limit_at_an_awkward_time_is_flagged_not_spun_on(
    autojump_clock,
):
    """A run started at 0.0274 s with stall_after=0.005: at the watcher's wake-up the
    time left to the limit came out as 2.6e-18 s, too little to move the clock, so the
    watcher slept until now again and again while the mock clock stood still (the run
    never ended). The item is flagged at its limit instead."""

    @stage(stall_after=0.005)
    async def slow(x):
        await trio.sleep(0.1)
        return x

    await trio.sleep(0.0274)
    with capture_logs() as logs:
        result = await Pipeline(slow, name="p").arun([1])
    assert [1] == result.outputs
    stalled = [e for e in _stall_events(logs) if e["event"] == "stage_stalled"]
    assert 1 == len(stalled)
    assert abs(stalled[0]["seconds"] - 0.005) < 1e-9


async def test_quick_items_never_stall(autojump_clock):
    """Items quicker than stall_after log nothing, however many."""

    @stage(workers=3, stall_after=2)
    async def quick(x):
        await trio.sleep(1.5)
        return x

    with capture_logs() as logs:
        await Pipeline(quick).arun(range(30))
    assert [] == _stall_events(logs)


async def test_throttled_waits_are_not_a_stall(autojump_clock):
    """Waits for a rate-limit token are throttling, not a stall: 10 items at 1/s through
    10 workers wait up to 9 s for tokens, and with stall_after=3 none is stalled."""

    @stage(workers=10, rate=1, stall_after=3)
    async def limited(x):
        await trio.sleep(1)
        return x

    with capture_logs() as logs:
        result = await Pipeline(limited).arun(range(10))
    assert 10 == len(result.outputs)
    assert [] == _stall_events(logs)


async def test_the_default_stall_after_comes_from_the_stages_own_latency(autojump_clock):
    """stall_after=None: 10 x the stage's p99 so far, at least 10 s. 200 items of 3 s
    make the limit 30 s: an item 25 s in its worker is not stalled, at 35 s it is."""

    @stage(workers=1)
    async def work(x):
        await trio.sleep(x)
        return x

    pipeline = Pipeline(work)
    seen = []

    async def look(at: float) -> None:
        await trio.sleep_until(at)
        seen.append(pipeline.current_workers())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look, 1.5)
        nursery.start_soon(look, 625)
        nursery.start_soon(look, 635)
        await pipeline.arun([3] * 200 + [40])
    first, before, after = (
        [(w.item, w.seconds, w.stalled, w.stall_after) for w in ws] for ws in seen
    )
    assert [("3", 1.5, False, 10.0)] == first  # no p99 yet: the floor
    assert [("40", 25.0, False, 30.0)] == before
    assert [("40", 35.0, True, 30.0)] == after
    assert None is pipeline.current_workers()


async def test_current_workers_shows_what_each_worker_does(autojump_clock):
    """A goroutine profile: behind a stage whose one worker is stuck on an item, the
    stage before it has a worker blocked sending and one waiting for input, with the
    seconds each has been so; the stuck one is named with its item."""
    gate = trio.Event()

    @stage(workers=2)
    async def fetch(x):
        await trio.sleep(1)
        return x

    @stage(workers=1, buffer=0)
    async def store(x):
        if x == "a":
            await gate.wait()
        return x

    pipeline = Pipeline(fetch | store, name="p")
    async with pipeline.open() as flow:
        await flow.send("a")
        await trio.sleep(0.5)
        await flow.send("b")
        await trio.sleep(9.5)
        workers = pipeline.current_workers()
        gate.set()
    rows = sorted((w.stage, w.state, w.seconds, w.item, w.stalled) for w in workers)
    assert [
        ("fetch", "sending", 8.5, None, False),  # "b" done at 1.5 s, store still busy
        ("fetch", "waiting", 9.0, None, False),  # handed "a" on at 1 s
        ("store", "calling", 9.0, "'a'", False),
    ] == rows
    assert {"stage", "worker", "state", "seconds", "item", "stalled", "stall_after"} == set(
        workers[0].to_dict()
    )


async def test_a_worker_waiting_for_a_token_is_throttled(autojump_clock):
    """rate=0.1 with 2 workers: the second item waits 10 s for its token; its worker
    shows "throttled" with the item, and not stalled even past stall_after."""

    @stage(workers=2, rate=0.1, stall_after=2)
    async def call(x):
        await trio.sleep(1)
        return x

    pipeline = Pipeline(call)
    seen = []

    async def look() -> None:
        await trio.sleep(5)
        seen.extend(pipeline.current_workers())

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            await pipeline.arun(["x", "y"])
    # The other worker did "x" at once and left: the input had ended.
    assert [("call", "throttled", 5.0, "'y'", False)] == [
        (w.stage, w.state, w.seconds, w.item, w.stalled) for w in seen
    ]
    assert [] == _stall_events(logs)


async def test_the_default_stall_after_allows_for_timeouts_and_retries(autojump_clock):
    """With timeout=8 and retries=2, an item may legitimately take 3 x 8 s: the default
    limit is 24 s, not the 10 s floor."""
    calls = 0

    @stage(timeout=8, retries=Retry(attempts=2, backoff=0), errors="skip")
    async def flaky(x):
        nonlocal calls
        calls += 1
        await trio.sleep(20)
        return x

    with capture_logs() as logs:
        await Pipeline(flaky).arun([1])
    assert 3 == calls
    assert [] == [e for e in _stall_events(logs) if e["event"] == "stage_stalled"]


async def test_a_stall_cut_short_by_a_stop_says_so(autojump_clock):
    """A stalled item that a stop takes from its worker: stage_unstalled, outcome
    "stopped", and the watcher is gone with the run."""

    @stage(stall_after=5)
    async def stuck(x):
        await trio.sleep_forever()

    pipeline = Pipeline(stuck, name="p")
    with capture_logs() as logs:
        with trio.move_on_after(7):
            await pipeline.arun([1])
    assert [("stage_stalled", 5.0), ("stage_unstalled", 7.0)] == [
        (e["event"], e["seconds"]) for e in _stall_events(logs)
    ]
    assert "stopped" == _stall_events(logs)[1]["outcome"]
    assert_nothing_left_running()


async def test_the_metrics_endpoint_serves_the_workers_as_json():
    """``/workers`` of the metrics endpoint: each worker's state as JSON; a worker stuck
    on an item is calling it, stalled once past stall_after (real clock)."""
    import json
    import urllib.request

    release = trio.Event()

    @stage(workers=2, stall_after=0.05)
    async def stuck(x):
        if x == "stuck":
            await release.wait()
        return x

    pipeline = Pipeline(stuck, name="w")

    def get(url: str) -> tuple[str, dict]:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.headers["Content-Type"], json.loads(r.read())

    with trio.fail_after(30):
        async with pipeline.open(metrics_port=0) as flow:
            await flow.send("stuck")
            await trio.sleep(0.2)
            host, port = pipeline.metrics_address
            kind, body = await trio.to_thread.run_sync(get, f"http://{host}:{port}/workers")
            release.set()
    assert "application/json" == kind
    rows = sorted((w["stage"], w["state"], w["item"], w["stalled"]) for w in body["workers"])
    assert [("stuck", "calling", "'stuck'", True), ("stuck", "waiting", None, False)] == rows


async def test_throttled_time_over_a_window_is_that_windows_share(autojump_clock):
    """8 workers behind rate=1: over 4.9-5.1 s every worker waits for a token, so the
    stage's throttled time grows by 8 x 0.2 s, in StageStats and in the Prometheus
    counter alike. Counted only when a wait ended, it grew by the 5 s wait that ended at
    5 s: "160% of their time" in a verdict over a short window."""
    from prometheus_client import CollectorRegistry

    @stage(workers=8, rate=1)
    async def call(x):
        return x

    registry = CollectorRegistry()
    pipeline = Pipeline(call, name="t", registry=registry)
    labels = {"pipeline": "t", "stage": "call"}
    seen = []

    async def look(at: float) -> None:
        await trio.sleep_until(at)
        stats = pipeline.current_stats()
        counter = registry.get_sample_value("pipeflow_stage_throttled_seconds_total", labels)
        seen.append((stats["call"].throttled_seconds, counter))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look, 4.9)
        nursery.start_soon(look, 5.1)
        await pipeline.arun(range(16))
    (stats_before, counter_before), (stats_after, counter_after) = seen
    assert 1.6 == pytest.approx(stats_after - stats_before)
    assert 1.6 == pytest.approx(counter_after - counter_before)


async def test_the_live_verdict_names_a_stalled_item(autojump_clock):
    """The verdict over two scrapes of a running pipeline (what the dashboard and
    ``pipeflow graph URL`` show) starts with a line for a stage with a stalled item: how
    long it has been in a worker, against stall_after."""
    from prometheus_client import CollectorRegistry

    from pipeflow._report.scrape import scrape_families, views_from_scrapes

    gate = trio.Event()

    @stage(workers=2, stall_after=2)
    async def stuck(x):
        if x == "stuck":
            await gate.wait()
        await trio.sleep(0.1)
        return x

    registry = CollectorRegistry()
    pipeline = Pipeline(stuck, name="p", registry=registry)
    labels = {"pipeline": "p", "stage": "stuck"}
    async with pipeline.open() as flow:
        await flow.send("stuck")
        for i in range(30):
            await flow.send(i)
        await trio.sleep(3 - trio.current_time())
        before = scrape_families(registry.collect())
        await trio.sleep(2)
        after = scrape_families(registry.collect())
        stalled = registry.get_sample_value("pipeflow_stage_stalled_workers", labels)
        stall_after = registry.get_sample_value("pipeflow_stage_stall_after_seconds", labels)
        gate.set()
    assert (1.0, 2.0) == (stalled, stall_after)
    (view,) = views_from_scrapes(before, after, 2.0, "test")
    assert (
        "stuck: an item has been in a worker for 5 s (stall_after 2 s): stalled; see what "
        "each worker is doing at /workers."
    ) == view.verdict.lines[0]
    assert ["stuck: an item has been"] == [line[:23] for line in view.verdict.stalls]


def test_the_run_live_view_lists_stalled_workers():
    """``pipeflow run``'s live view lists each stalled worker under the stages: stage,
    worker, item, for how long, against stall_after."""
    import io

    from pipeflow import WorkerStatus
    from pipeflow._cli.progress import Progress
    from pipeflow._report import Series
    from pipeflow._stats import StageCounters

    out = io.StringIO()
    progress = Progress(out, mode="live", title="t")
    c = StageCounters("fetch")
    c.workers = 2
    workers = [
        WorkerStatus(
            stage="fetch",
            worker=1,
            state="calling",
            seconds=42.0,
            item="'https://example.com/slow'",
            stalled=True,
            stall_after=10.0,
        ),
        WorkerStatus(stage="fetch", worker=0, state="waiting", seconds=1.0, stall_after=10.0),
    ]
    progress.update(1.0, {"fetch": c.snapshot(1.0, 1.0)}, Series(), workers)
    assert (
        "fetch[1] on 'https://example.com/slow' for 42 s: stalled (stall_after 10 s)"
        in out.getvalue()
    )


async def test_graph_of_a_live_endpoint_shows_what_each_worker_does():
    """``pipeflow graph URL`` of a running pipeline lists its workers by state, and the
    stalled one with its item (real clock, a real endpoint, the CLI in a subprocess)."""
    import subprocess
    import sys

    release = trio.Event()

    @stage(workers=3, stall_after=0.05)
    async def hang(x):
        if x == "stuck":
            await release.wait()
        return x

    pipeline = Pipeline(hang, name="g")

    def graph(url: str) -> str:
        cmd = [sys.executable, "-m", "pipeflow", "graph", url, "--interval", "0.2"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout

    with trio.fail_after(60):
        async with pipeline.open(metrics_port=0) as flow:
            await flow.send("stuck")
            await trio.sleep(0.2)
            host, port = pipeline.metrics_address
            text = await trio.to_thread.run_sync(graph, f"http://{host}:{port}/metrics")
            release.set()
    assert "hang: an item has been in a worker for" in text
    assert "workers now:\n  hang  1 calling, 2 waiting\n  hang[" in text
    assert "calling" in text.split("workers now:")[1]
    assert "'stuck'  STALLED (stall_after 50 ms)" in text


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
async def test_the_dashboard_shows_the_workers_and_the_stall(tmp_path):
    """The live dashboard at ``/``, drawn by headless Chromium: a line for the stalled
    item above the verdict, and a table of the workers with the stalled one marked."""
    import subprocess

    release = trio.Event()

    @stage(workers=2, stall_after=0.5)
    async def hang(x):
        if x == "stuck":
            await release.wait()
        return x

    pipeline = Pipeline(hang, name="d")

    def dom(base: str) -> str:
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        args += ["--virtual-time-budget=2000", "--dump-dom", base + "/"]
        return subprocess.run(args, capture_output=True, text=True, timeout=90).stdout

    with trio.fail_after(120):
        async with pipeline.open(metrics_port=0) as flow:
            await flow.send("stuck")
            await trio.sleep(2.5)  # two samples of the dashboard, and past stall_after
            host, port = pipeline.metrics_address
            page = await trio.to_thread.run_sync(dom, f"http://{host}:{port}")
            release.set()
    assert 'class="verdict stall" data-kind="stall">hang: an item has been in a worker' in page
    assert '<tr data-stage="hang" data-state="calling" class="stalled">' in page
    assert '<tr data-stage="hang" data-state="waiting" class="">' in page
    assert "&#39;stuck&#39;" in page or "'stuck'" in page


STALLING_APP = """
import trio
from pipeflow import Pipeline, stage

@stage(workers=2, stall_after=0.2)
async def work(line):
    await trio.sleep(1.6 if line == "slow" else 0.01)
    return line

pipeline = Pipeline(work, name="stalling")
"""


def test_pipeflow_run_reports_the_items_that_stalled(tmp_path):
    """``pipeflow run``: an item stalled during the run is in the report's ``stalls`` and
    in the verdict of the summary, with how long it was seen in its worker (at least)."""
    import json
    import subprocess
    import sys

    (tmp_path / "stallapp.py").write_text(STALLING_APP)
    (tmp_path / "in.txt").write_text("a\nslow\nb\n")
    args = ["run", "stallapp:pipeline", "--input", "in.txt", "--report", "r.json"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeflow", *args],
        cwd=tmp_path,  # the CLI imports stallapp from the current directory
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 0 == proc.returncode, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    (stall,) = report["stalls"]
    assert ("work", "'slow'", 0.2) == (stall["stage"], stall["item"], stall["stall_after"])
    assert 0.9 <= stall["seconds"] <= 1.6
    assert "verdict: work: item 'slow' was in a worker for at least" in proc.stdout
    assert "stage_stalled" in proc.stderr  # the warning, printed as it happened


async def test_batch_and_keyed_stages_show_their_workers(autojump_clock):
    """A batch stage's worker calls a batch (its item is the list); a keyed stage has a
    worker per key shard, numbered from 0."""
    gate = trio.Event()

    @stage(batch=3)
    async def write(rows):
        await gate.wait()
        return len(rows)

    @stage(workers=3, key=lambda x: x % 3)
    async def by_key(x):
        await gate.wait()
        return x

    seen = {}
    for name, p, items in (
        ("write", Pipeline(write), [1, 2, 3]),
        ("by_key", Pipeline(by_key), [0]),
    ):
        async with p.open() as flow:
            for x in items:
                await flow.send(x)
            await trio.sleep(1)
            seen[name] = [(w.worker, w.state, w.item) for w in p.current_workers()]
            gate.set()
        gate = trio.Event()
    assert [(0, "calling", "[1, 2, 3]")] == seen["write"]
    assert [0, 1, 2] == [w for w, _, _ in seen["by_key"]]
    assert ["calling", "waiting", "waiting"] == sorted(s for _, s, _ in seen["by_key"])
