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
    make the limit 30 s: an item of 25 s is not stalled, one of 40 s is, at 30 s."""

    @stage(workers=1)
    async def work(x):
        await trio.sleep(x)
        return x

    with capture_logs() as logs:
        await Pipeline(work).arun([3] * 200 + [25, 40])
    stalled = [e for e in _stall_events(logs) if e["event"] == "stage_stalled"]
    assert [(40, 30.0, 30.0)] == [(int(e["item"]), e["seconds"], e["stall_after"]) for e in stalled]


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
