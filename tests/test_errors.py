"""Error policies under real runs: fail-fast, collect, skip, embed, retries with backoff,
per-attempt timeouts, dead letters, error budgets, and their combinations.

Every test that involves time runs under ``autojump_clock`` and asserts exact times.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
import traceback

import pytest
import structlog
import structlog.testing
import trio
import trio.testing
from structlog.testing import capture_logs

import pipeflow
from pipeflow import (
    CircuitBreaker,
    CircuitOpen,
    Failed,
    Pipeline,
    Retry,
    StageError,
    TooManyFailures,
    stage,
)


@pytest.fixture(autouse=True)
def _structlog_as_found():
    """capture_logs() leaves structlog marked as configured; undo that after each test so
    later tests see pipeflow's default logging."""
    yield
    structlog.reset_defaults()


def assert_conserved(result):
    """Every stage accounts for each input: ok, filtered, failed or dropped."""
    for name, s in result.stats.items():
        assert s.items_in == s.ok + s.filtered + s.failed + s.dropped, name
        assert 0 == s.inflight, name


def fails_on(*bad, error=ValueError):
    """An async stage function that raises ``error`` for the items in ``bad``."""

    async def fn(x):
        if x in bad:
            raise error(f"bad item {x}")
        return x

    return fn


# -- fail_fast ----------------------------------------------------------------------------


async def test_fail_fast_is_the_default_and_names_the_stage_and_item():
    """Without errors=, the first failure raises StageError naming stage, item and cause."""

    @stage(workers=3)
    async def parse(x):
        if x == "b":
            raise ValueError("not a number")
        return x

    with pytest.raises(StageError) as info:
        await Pipeline(parse).arun(["a", "b", "c"])
    err = info.value
    assert ("parse", "b", 1) == (err.stage, err.item, err.attempts)
    assert "stage 'parse' failed on item 'b': ValueError: not a number" == str(err)
    assert isinstance(err.__cause__, ValueError)
    assert err.error is err.__cause__


async def test_stage_error_cause_keeps_the_traceback_of_the_user_function():
    """The cause's traceback reaches the line that raised, in task and thread stages."""

    def deep_helper(x):
        raise LookupError(f"missing {x}")

    @stage
    async def in_task(x):
        deep_helper(x)

    @stage
    def in_thread(x):
        deep_helper(x)

    for st in (in_task, in_thread):
        with pytest.raises(StageError) as info:
            await Pipeline(st).arun([1])
        frames = [f.name for f in traceback.extract_tb(info.value.__cause__.__traceback__)]
        assert "deep_helper" == frames[-1]
        assert st.name in frames
        formatted = "".join(traceback.format_exception(info.value))
        assert "LookupError: missing 1" in formatted
        assert "The above exception was the direct cause" in formatted


async def test_stage_error_message_shortens_a_huge_item():
    """The message shows a short repr of the item; the attribute keeps the whole item."""
    big = "x" * 10_000

    @stage
    async def boom(x):
        raise RuntimeError("no")

    with pytest.raises(StageError) as info:
        await Pipeline(boom).arun([big])
    assert big == info.value.item
    assert len(str(info.value)) < 200
    assert str(info.value).startswith("stage 'boom' failed on item 'xxxx")


async def test_fail_fast_in_a_later_stage_names_that_stage():
    """A failure in the second stage is reported as that stage's, with its input."""

    @stage
    async def first(x):
        return x * 10

    second = stage(name="second")(fails_on(30))
    with pytest.raises(StageError) as info:
        await Pipeline(first | second).arun(range(5))
    assert ("second", 30) == (info.value.stage, info.value.item)


def test_stage_error_pickles_with_its_attributes():
    """A StageError crosses process boundaries (and logs) with stage, item and attempts."""
    import pickle

    err = StageError("s", {"id": 1}, KeyError("k"), attempts=3)
    back = pickle.loads(pickle.dumps(err))
    assert ("s", {"id": 1}, 3) == (back.stage, back.item, back.attempts)
    assert isinstance(back.__cause__, KeyError)
    assert str(err) == str(back)


# -- collect --------------------------------------------------------------------------------


async def test_collect_keeps_going_and_gathers_every_failure():
    """errors="collect": the run finishes; each failure is a StageError in result.errors."""
    picky = stage(name="picky", workers=3, errors="collect")(fails_on(2, 5, 7))
    result = await Pipeline(picky, name="p").arun(range(10))
    assert [0, 1, 3, 4, 6, 8, 9] == sorted(result.outputs)
    assert [2, 5, 7] == sorted(e.item for e in result.errors)
    for err in result.errors:
        assert isinstance(err, StageError)
        assert "picky" == err.stage
        assert isinstance(err.__cause__, ValueError)
        assert f"bad item {err.item}" == str(err.__cause__)
    s = result.stats["picky"]
    assert (10, 7, 7, 3) == (s.items_in, s.items_out, s.ok, s.failed)
    assert_conserved(result)


async def test_raise_for_errors_raises_one_exception_group():
    """raise_for_errors() raises the collected StageErrors together; no-op when none."""
    picky = stage(name="picky", errors="collect")(fails_on(1, 3))
    result = await Pipeline(picky, name="p").arun(range(4))
    with pytest.raises(ExceptionGroup) as info:
        result.raise_for_errors()
    group = info.value
    assert "2 items failed in pipeline 'p'" == group.message
    assert result.errors == list(group.exceptions)
    assert [1, 3] == sorted(e.item for e in group.exceptions)

    clean = await Pipeline(picky).arun([0, 2])
    clean.raise_for_errors()  # nothing failed: nothing raised
    assert [] == clean.errors


async def test_collect_in_two_stages_reports_each_stage():
    """Failures of different stages are all collected, each naming its own stage."""
    a = stage(name="a", errors="collect")(fails_on(1))
    b = stage(name="b", errors="collect")(fails_on(2))
    result = await Pipeline(a | b).arun(range(4))
    assert {("a", 1), ("b", 2)} == {(e.stage, e.item) for e in result.errors}
    assert [0, 3] == sorted(result.outputs)
    assert (4, 1, 3, 1) == (
        result.stats["a"].items_in,
        result.stats["a"].failed,
        result.stats["b"].items_in,
        result.stats["b"].failed,
    )
    assert_conserved(result)


# -- skip -----------------------------------------------------------------------------------


async def test_skip_logs_counts_and_drops():
    """errors="skip": the item is dropped, counted as failed, logged; no error kept."""
    picky = stage(name="picky", errors="skip")(fails_on(3))
    with capture_logs() as logs:
        result = await Pipeline(picky, name="p").arun(range(5))
    assert [0, 1, 2, 4] == sorted(result.outputs)
    assert [] == result.errors
    s = result.stats["picky"]
    assert (5, 4, 1) == (s.items_in, s.ok, s.failed)
    assert_conserved(result)
    failures = [e for e in logs if e["event"] == "stage_failed"]
    assert 1 == len(failures)
    event = failures[0]
    assert ("picky", "3", "skip", 1, "warning") == (
        event["stage"],
        event["item"],
        event["policy"],
        event["attempts"],
        event["log_level"],
    )
    assert "ValueError('bad item 3')" == event["error"]


# -- embed ----------------------------------------------------------------------------------


async def test_embed_turns_a_failure_into_a_value_in_the_outputs():
    """errors="embed": the failure arrives in the outputs as Failed(item, error, stage)."""
    picky = stage(name="picky", errors="embed")(fails_on(2))
    result = await Pipeline(picky).arun(range(4))
    failed = [o for o in result.outputs if isinstance(o, Failed)]
    assert [0, 1, 3] == sorted(o for o in result.outputs if not isinstance(o, Failed))
    assert 1 == len(failed)
    f = failed[0]
    assert (2, "picky", 1) == (f.item, f.stage, f.attempts)
    assert isinstance(f.error, ValueError)
    assert f.error.__traceback__ is not None
    assert [] == result.errors
    assert 1 == result.stats["picky"].failed
    assert_conserved(result)


async def test_embedded_failure_passes_later_stages_untouched():
    """Later stages do not call their function on a Failed; they forward it and count it."""
    seen = []
    picky = stage(name="picky", errors="embed")(fails_on(1))

    @stage(workers=2)
    async def later(x):
        seen.append(x)
        return x * 100

    @stage
    def flat(x):
        yield x
        yield x + 1

    result = await Pipeline(picky | later | flat).arun(range(3))
    assert [0, 2] == sorted(seen)
    outputs = result.outputs
    assert [0, 1, 200, 201] == sorted(o for o in outputs if not isinstance(o, Failed))
    failed = [o for o in outputs if isinstance(o, Failed)]
    assert [(1, "picky")] == [(f.item, f.stage) for f in failed]
    assert (2, 1) == (result.stats["later"].items_in, result.stats["later"].passed)
    assert (2, 4, 1) == (
        result.stats["flat"].items_in,
        result.stats["flat"].items_out,
        result.stats["flat"].passed,
    )
    assert_conserved(result)


async def test_embed_keeps_input_order_through_ordered_stages(autojump_clock):
    """With ordered stages, Failed values sit where their items would have been."""

    @stage(workers=4, ordered=True, errors="embed")
    async def first(x):
        await trio.sleep((7 * x) % 5)
        if x % 3 == 0:
            raise ValueError(x)
        return x

    @stage(workers=3, ordered=True, errors="embed")
    async def second(x):
        await trio.sleep((3 * x) % 4)
        if x % 4 == 1:
            raise KeyError(x)
        return x

    result = await Pipeline(first | second).arun(range(20))
    shape = [(o.stage, o.item) if isinstance(o, Failed) else o for o in result.outputs]
    expected = [
        ("first", x) if x % 3 == 0 else ("second", x) if x % 4 == 1 else x for x in range(20)
    ]
    assert expected == shape
    assert_conserved(result)


async def test_embed_under_a_non_failing_ordered_stage_keeps_order(autojump_clock):
    """An unordered failing stage feeding an ordered one: order follows arrival there."""

    @stage(workers=1, errors="embed")
    async def first(x):
        if x == 1:
            raise ValueError(x)
        return x

    @stage(workers=3, ordered=True)
    async def slow(x):
        await trio.sleep(3 - x)
        return x

    result = await Pipeline(first | slow).arun(range(3))
    assert [0, Failed, 2] == [type(o) if isinstance(o, Failed) else o for o in result.outputs]


# -- retries --------------------------------------------------------------------------------


def timed_failures(times, fail_until=None, error=ConnectionError):
    """A stage function that records when it is called and fails (always, or until the
    clock reaches ``fail_until``)."""

    async def fn(x):
        times.append(trio.current_time())
        if fail_until is None or trio.current_time() < fail_until:
            raise error(f"attempt at {trio.current_time():g}")
        return x

    return fn


async def test_retry_backoff_is_exponential_at_exact_times(autojump_clock):
    """Retry(attempts=3, backoff=1, multiplier=2): attempts at t=0, 1, 3, 7, then fail."""
    times = []
    flaky = stage(
        name="flaky", errors="collect", retries=Retry(attempts=3, backoff=1, multiplier=2)
    )(timed_failures(times))
    result = await Pipeline(flaky).arun(["a"])
    assert [0.0, 1.0, 3.0, 7.0] == times
    assert 7.0 == result.elapsed
    [err] = result.errors
    assert 4 == err.attempts
    assert (
        "stage 'flaky' failed on item 'a' after 4 attempts: ConnectionError: attempt at 7"
        == str(err)
    )
    s = result.stats["flaky"]
    assert (1, 3, 1, 0) == (s.items_in, s.retried, s.failed, s.ok)
    assert_conserved(result)


async def test_retry_succeeds_on_a_later_attempt(autojump_clock):
    """An item that succeeds on its third attempt is ok; two retries are counted."""
    times = []
    flaky = stage(name="flaky", retries=Retry(attempts=5, backoff=1, multiplier=2))(
        timed_failures(times, fail_until=2)
    )
    result = await Pipeline(flaky).arun(["a"])
    assert [0.0, 1.0, 3.0] == times
    assert ["a"] == result.outputs
    s = result.stats["flaky"]
    assert (1, 2, 0, 1) == (s.ok, s.retried, s.failed, s.items_out)


async def test_retries_int_uses_the_default_backoff(autojump_clock):
    """retries=2 means two more attempts, 0.1 s then 0.2 s apart."""
    times = []
    flaky = stage(name="flaky", retries=2)(timed_failures(times))
    with pytest.raises(StageError) as info:
        await Pipeline(flaky).arun([1])
    assert [0.0, 0.1, 0.3] == pytest.approx(times)
    assert 3 == info.value.attempts
    assert "after 3 attempts" in str(info.value)


async def test_backoff_is_capped_by_max_backoff(autojump_clock):
    """The delay grows by the multiplier until it reaches max_backoff."""
    times = []
    policy = Retry(attempts=4, backoff=1, multiplier=10, max_backoff=5)
    flaky = stage(name="flaky", errors="skip", retries=policy)(timed_failures(times))
    await Pipeline(flaky).arun([1])
    assert [0.0, 1.0, 6.0, 11.0, 16.0] == times


async def test_jitter_spreads_each_delay_within_its_bounds(autojump_clock):
    """jitter=0.5 puts each delay within ±50% of the exponential schedule."""
    runs = []
    policy = Retry(attempts=3, backoff=2, multiplier=2, jitter=0.5)
    for _ in range(10):
        times = []
        flaky = stage(name="flaky", errors="skip", retries=policy)(timed_failures(times))
        start = trio.current_time()
        await Pipeline(flaky).arun([1])
        gaps = [b - a for a, b in zip([start, *times], times, strict=False)][1:]
        for gap, base in zip(gaps, [2, 4, 8], strict=True):
            assert base * 0.5 <= gap <= base * 1.5
        runs.append(tuple(gaps))
    assert len(set(runs)) > 1  # jitter does spread them


async def test_only_listed_exceptions_are_retried(autojump_clock):
    """Retry(on=...) retries those types; any other exception fails at once."""
    calls = []

    @stage(errors="collect", retries=Retry(attempts=3, backoff=1, on=(ConnectionError,)))
    async def fetch(x):
        calls.append((x, trio.current_time()))
        if x == "refused":
            raise ConnectionRefusedError("retry me")  # a ConnectionError subclass
        raise PermissionError("do not retry me")

    result = await Pipeline(fetch).arun(["refused", "forbidden"])
    errors = {e.item: e for e in result.errors}
    assert 4 == errors["refused"].attempts
    assert 1 == errors["forbidden"].attempts
    assert isinstance(errors["forbidden"].__cause__, PermissionError)
    assert 1 == sum(1 for x, _ in calls if x == "forbidden")
    assert 3 == result.stats["fetch"].retried


async def test_each_retry_is_logged_with_its_attempt_number(autojump_clock):
    """item_retried is logged per retry with the attempt that failed and the delay."""
    times = []
    flaky = stage(name="flaky", errors="skip", retries=Retry(attempts=2, backoff=1))(
        timed_failures(times)
    )
    with capture_logs() as logs:
        await Pipeline(flaky).arun(["a"])
    retried = [e for e in logs if e["event"] == "item_retried"]
    assert [(1, 1.0), (2, 2.0)] == [(e["attempt"], e["delay"]) for e in retried]
    assert {"flaky"} == {e["stage"] for e in retried}
    assert "ConnectionError('attempt at 0')" == retried[0]["error"]
    [failed] = [e for e in logs if e["event"] == "stage_failed"]
    assert 3 == failed["attempts"]


async def test_retried_generator_stage_keeps_only_the_successful_attempts_outputs(
    autojump_clock,
):
    """A flat-map that fails halfway is retried whole; partial outputs are discarded."""
    attempts = []

    @stage(retries=Retry(attempts=2, backoff=1))
    async def expand(x):
        attempts.append(x)
        yield (x, "first")
        if len(attempts) < 2:
            raise ConnectionError("halfway")
        yield (x, "second")

    result = await Pipeline(expand).arun([7])
    assert [(7, "first"), (7, "second")] == result.outputs
    assert (1, 2, 1) == (
        result.stats["expand"].retried,
        result.stats["expand"].items_out,
        result.stats["expand"].ok,
    )


async def test_retries_in_a_thread_stage():
    """Plain functions in worker threads are retried too."""
    calls = []

    @stage(retries=Retry(attempts=3, backoff=0))
    def flaky(x):
        calls.append(threading.current_thread().name)
        if len(calls) < 3:
            raise OSError("again")
        return x + 1

    result = await Pipeline(flaky, name="p").arun([1])
    assert [2] == result.outputs
    assert 3 == len(calls)
    assert {"pipeflow:p:flaky"} == set(calls)
    assert 2 == result.stats["flaky"].retried


# -- timeouts -------------------------------------------------------------------------------


async def test_timeout_is_per_attempt_and_timeouts_are_retried(autojump_clock):
    """timeout=2 with Retry(attempts=2, backoff=1): attempts at 0, 3, 7; each cut at 2 s."""
    starts = []

    @stage(timeout=2, errors="collect", retries=Retry(attempts=2, backoff=1, multiplier=2))
    async def hangs(x):
        starts.append(trio.current_time())
        await trio.sleep(100)

    result = await Pipeline(hangs).arun([1])
    assert [0.0, 3.0, 7.0] == starts
    assert 9.0 == result.elapsed
    [err] = result.errors
    assert isinstance(err.__cause__, TimeoutError)
    assert "stage 'hangs' timed out after 2s" == str(err.__cause__)
    assert 3 == err.attempts
    assert 2 == result.stats["hangs"].retried


async def test_a_slow_attempt_then_a_fast_one_succeeds(autojump_clock):
    """A timed-out attempt is retried and a later, quick attempt's output is kept."""
    starts = []

    @stage(timeout=5, retries=Retry(attempts=1, backoff=1))
    async def sometimes_slow(x):
        starts.append(trio.current_time())
        await trio.sleep(10 if len(starts) == 1 else 1)
        return x

    result = await Pipeline(sometimes_slow).arun(["a"])
    assert ["a"] == result.outputs
    assert [0.0, 6.0] == starts
    assert 7.0 == result.elapsed


async def test_timeout_not_retried_when_retry_on_excludes_it(autojump_clock):
    """Retry(on=(ConnectionError,)) does not retry a timeout."""
    starts = []

    @stage(timeout=1, errors="collect", retries=Retry(attempts=3, on=(ConnectionError,)))
    async def hangs(x):
        starts.append(trio.current_time())
        await trio.sleep(100)

    result = await Pipeline(hangs).arun([1])
    assert [0.0] == starts
    assert 1 == result.errors[0].attempts
    assert 1.0 == result.elapsed


async def test_thread_stage_timeout_waits_for_the_thread_then_reports_it(autojump_clock):
    """A thread cannot be interrupted: the stage waits for it, then reports TimeoutError."""
    release = threading.Event()

    @stage(timeout=2, errors="collect")
    def blocking(x):
        release.wait()
        return x * 10

    async def let_go_at_5():
        await trio.sleep(5)
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(let_go_at_5)
        result = await Pipeline(blocking).arun([1])
    assert 5.0 == trio.current_time()
    assert [] == result.outputs
    [err] = result.errors
    assert isinstance(err.__cause__, TimeoutError)


async def test_thread_stage_finishing_within_its_timeout_is_fine():
    """The timeout does not touch a thread that finishes in time.

    (Real clock on purpose: under autojump_clock the clock jumps to the deadline while
    Trio waits for the thread, so every thread call would "time out".)"""

    @stage(timeout=2)
    def quick(x):
        return x * 10

    assert [10] == (await Pipeline(quick).arun([1])).outputs


async def test_process_stage_timeout_kills_the_worker_process():
    """A process worker past its deadline is killed: the item fails with TimeoutError
    long before the function would have returned, and no process is left behind."""
    sleeper = stage(name="sleeper", run_in="process", timeout=1, errors="collect")(time.sleep)
    start = time.monotonic()
    result = await Pipeline(sleeper).arun([60])
    assert time.monotonic() - start < 20
    [err] = result.errors
    assert isinstance(err.__cause__, TimeoutError)
    assert [] == multiprocessing.active_children()


async def test_process_stage_timeout_does_not_count_worker_start_up():
    """timeout= bounds the call, not the start of a worker process: a function that
    returns at once succeeds even with a timeout shorter than a process takes to start."""
    quick = stage(name="quick", run_in="process", timeout=0.05, errors="collect")(time.sleep)
    result = await Pipeline(quick).arun([0, 0])
    assert [] == result.errors
    assert [None, None] == result.outputs


# -- dead letters ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fail_fast", "collect", "skip", "embed"])
async def test_dead_letter_receives_every_failure_under_every_policy(policy):
    """Whatever the policy, the dead-letter sink gets a Failed for each failed item."""
    letters = []
    picky = stage(name="picky", workers=2, errors=policy, dead_letter=letters.append)(
        fails_on(1, 4)
    )
    if policy == "fail_fast":
        with pytest.raises(StageError) as info:
            await Pipeline(picky).arun([1])
        assert 1 == info.value.item
        assert [1] == [f.item for f in letters]
    else:
        result = await Pipeline(picky).arun(range(6))
        assert [1, 4] == sorted(f.item for f in letters)
        assert_conserved(result)
    for f in letters:
        assert isinstance(f, Failed)
        assert "picky" == f.stage
        assert isinstance(f.error, ValueError)
        assert 1 == f.attempts


async def test_dead_letter_gets_items_whose_retries_ran_out(autojump_clock):
    """An item that failed every attempt reaches the sink once, with its attempt count."""
    letters = []
    times = []
    flaky = stage(
        name="flaky",
        errors="skip",
        retries=Retry(attempts=2, backoff=1),
        dead_letter=letters.append,
    )(timed_failures(times))
    await Pipeline(flaky).arun(["a"])
    [f] = letters
    assert ("a", "flaky", 3) == (f.item, f.stage, f.attempts)
    assert "attempt at 3" == str(f.error)


async def test_dead_letter_can_be_async_and_may_wait(autojump_clock):
    """An async sink is awaited; the worker waits for it (backpressure, not loss)."""
    letters = []

    async def sink(failed):
        await trio.sleep(1)
        letters.append((failed.item, trio.current_time()))

    picky = stage(name="picky", errors="skip", dead_letter=sink)(fails_on(0, 1))
    await Pipeline(picky).arun(range(3))
    assert [(0, 1.0), (1, 2.0)] == letters


async def test_dead_letter_can_be_a_stage():
    """A Stage as dead letter runs as a side stage that receives each Failed."""
    letters = []
    thread_names = []

    @stage
    async def async_sink(failed):
        letters.append(("async", failed.item))

    @stage
    def thread_sink(failed):
        thread_names.append(threading.current_thread() is threading.main_thread())
        letters.append(("thread", failed.item))

    @stage
    async def agen_sink(failed):
        letters.append(("agen", failed.item))
        yield failed

    for sink in (async_sink, thread_sink, agen_sink):
        picky = stage(name="picky", errors="collect", dead_letter=sink)(fails_on(2))
        await Pipeline(picky).arun(range(3))
    assert [("async", 2), ("thread", 2), ("agen", 2)] == letters
    assert [False] == thread_names  # a sync stage's function runs in a worker thread


@pytest.mark.parametrize("api", ["arun", "stream", "open"])
async def test_the_item_that_stops_a_fail_fast_run_reaches_a_dead_letter_stage(api, autojump_clock):
    """docs/errors.md: a dead-letter sink receives every Failed, the item that stops a
    fail-fast run too, however the run is read. (Read through stream(), the stop
    cancelled the dead-letter stage before it had the item: it was only listed as
    unfinished.)"""
    letters = []

    @stage(name="dl")
    async def sink(failed):
        await trio.sleep(1.0)
        letters.append(failed.item)

    @stage(workers=2, dead_letter=sink)
    async def picky(x):
        await trio.sleep(0.01)
        if x == 1:
            raise ValueError(x)
        return x

    pipeline = Pipeline(picky)

    async def read() -> None:
        if api == "arun":
            await pipeline.arun(range(6))
        elif api == "stream":
            async with pipeline.stream(range(6)) as outputs:
                async for _ in outputs:
                    pass
        else:
            async with pipeline.open() as flow:
                for i in range(6):
                    await flow.send(i)

    with pytest.raises(StageError) as caught:
        await read()
    assert [1] == letters
    unfinished = caught.value.result.unfinished
    assert ("dl", 1) not in [(st, getattr(it, "item", it)) for st, it in unfinished]


async def test_dead_letter_stage_with_a_resource_gets_it_and_closes_it():
    """A sink stage that declares a resource (a DB connection) receives it; the resource
    is closed by the end of the run."""
    events = []

    @contextlib.asynccontextmanager
    async def open_db():
        events.append("open")
        try:
            yield "conn"
        finally:
            events.append("close")

    @stage(resource=open_db)
    async def store_failure(failed, conn):
        events.append((failed.item, conn))

    picky = stage(name="picky", workers=2, errors="collect", dead_letter=store_failure)(
        fails_on(1, 2)
    )
    result = await Pipeline(picky).arun(range(4))
    assert 2 == len(result.errors)
    assert [(1, "conn"), (2, "conn")] == sorted(e for e in events if isinstance(e, tuple))
    assert events.count("open") == events.count("close") >= 1
    assert "close" == events[-1]


async def test_pipeline_dead_letter_is_the_default_and_a_stage_may_override_it():
    """Pipeline(dead_letter=...) serves every stage that sets none of its own."""
    default, own = [], []
    a = stage(name="a", errors="collect")(fails_on(1))
    b = stage(name="b", errors="collect", dead_letter=own.append)(fails_on(2))
    c = stage(name="c", errors="embed")(fails_on(3))
    result = await Pipeline(a | b | c, dead_letter=default.append).arun(range(5))
    assert [("a", 1), ("c", 3)] == sorted((f.stage, f.item) for f in default)
    assert [("b", 2)] == [(f.stage, f.item) for f in own]
    assert 2 == len(result.errors)


async def test_dead_letter_gets_timeouts(autojump_clock):
    """A timed-out item reaches the sink with a TimeoutError."""
    letters = []

    @stage(timeout=1, errors="skip", dead_letter=letters.append)
    async def hangs(x):
        await trio.sleep(10)

    await Pipeline(hangs).arun([1])
    [f] = letters
    assert isinstance(f.error, TimeoutError)


@pytest.mark.parametrize("policy", ["fail_fast", "collect", "skip", "embed"])
async def test_a_failing_dead_letter_sink_fails_the_run_clearly(policy):
    """If the sink itself raises, the run stops with a StageError that says so."""

    def broken_sink(failed):
        raise OSError("dead-letter queue unreachable")

    picky = stage(name="picky", errors=policy, dead_letter=broken_sink)(fails_on(1))
    with pytest.raises(StageError) as info:
        await Pipeline(picky).arun(range(3))
    err = info.value
    assert "picky.dead_letter" == err.stage
    assert isinstance(err.item, Failed)
    assert 1 == err.item.item
    assert isinstance(err.__cause__, OSError)
    assert "stage 'picky.dead_letter' failed on item Failed(" in str(err)
    assert "OSError: dead-letter queue unreachable" in str(err)


# -- error budgets --------------------------------------------------------------------------


async def test_int_budget_allows_that_many_failures():
    """max_failures=2: two failures are collected and the run completes."""
    picky = stage(name="picky", errors="collect", max_failures=2)(fails_on(1, 2))
    result = await Pipeline(picky).arun(range(10))
    assert 2 == len(result.errors)
    assert 8 == len(result.outputs)


async def test_int_budget_exceeded_stops_the_run():
    """The failure after the budget raises TooManyFailures (a StageError) with a note."""
    picky = stage(name="picky", errors="collect", max_failures=2)(fails_on(1, 2, 3, 4))
    with capture_logs() as logs, pytest.raises(TooManyFailures) as info:
        await Pipeline(picky).arun(range(10))
    err = info.value
    assert isinstance(err, StageError)
    assert ("picky", 3) == (err.stage, err.item)
    assert isinstance(err.__cause__, ValueError)
    assert [
        "stage 'picky': 3 of 4 items failed, over its error budget max_failures=2"
    ] == err.__notes__
    [event] = [e for e in logs if e["event"] == "error_budget_exceeded"]
    assert (3, 2) == (event["failed"], event["max_failures"])


async def test_zero_budget_fails_on_the_first_failure_but_still_dead_letters():
    """max_failures=0 with skip: the first failure reaches the sink, then stops the run."""
    letters = []
    picky = stage(name="picky", errors="skip", max_failures=0, dead_letter=letters.append)(
        fails_on(2)
    )
    with pytest.raises(TooManyFailures):
        await Pipeline(picky).arun(range(5))
    assert [2] == [f.item for f in letters]


async def test_fraction_budget_checked_at_the_end_of_a_short_stream():
    """max_failures=0.25 over 8 items: 2 failures pass, 3 fail the run at the end."""
    ok = stage(name="ok", errors="skip", max_failures=0.25)(fails_on(1, 5))
    result = await Pipeline(ok).arun(range(8))
    assert 6 == len(result.outputs)

    over = stage(name="over", errors="skip", max_failures=0.25)(fails_on(1, 5, 6))
    with structlog.testing.capture_logs() as logs, pytest.raises(TooManyFailures) as info:
        await Pipeline(over).arun(range(8))
    assert "over" == info.value.stage
    assert info.value.item is None
    assert "3 of 8 items failed" in str(info.value)
    # The note says how many, as the one for a budget that runs out mid-run does.
    assert [
        "stage 'over': 3 of 8 items failed, over its error budget max_failures=0.25"
    ] == info.value.__notes__
    exceeded = [e for e in logs if e["event"] == "error_budget_exceeded"]
    assert [(e["stage"], e["failed"], e["items_in"], e["scope"]) for e in exceeded] == [
        ("over", 3, 8, "stage")
    ]


async def test_fraction_budget_stops_a_long_stream_early():
    """On an endless stream, a fraction is checked once there is a sample: the run stops."""

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    @stage(errors="skip", max_failures=0.1)
    async def half_bad(x):
        if x % 2:
            raise ValueError(x)
        return x

    with pytest.raises(TooManyFailures) as info:
        await Pipeline(half_bad).arun(endless())
    # The check waits for 10 / 0.1 = 100 items before it trusts the fraction.
    assert 99 <= info.value.item <= 101


async def test_budget_counts_failures_of_the_stage_not_the_pipeline():
    """Each stage has its own budget; failures upstream do not count against it."""
    a = stage(name="a", errors="collect")(fails_on(1, 2, 3))
    b = stage(name="b", errors="collect", max_failures=1)(fails_on(5))
    result = await Pipeline(a | b).arun(range(8))
    assert 4 == len(result.errors)


async def test_pipeline_budget_adds_up_failures_of_every_stage():
    """Pipeline(max_failures=2): collect and skip failures of all stages count together."""
    a = stage(name="a", errors="collect")(fails_on(1))
    b = stage(name="b", errors="skip")(fails_on(2))
    result = await Pipeline(a | b, max_failures=2).arun(range(5))
    assert [0, 3, 4] == sorted(result.outputs)

    c = stage(name="c", errors="skip")(fails_on(2, 3))
    with capture_logs() as logs, pytest.raises(TooManyFailures) as info:
        await Pipeline(a | c, name="p", max_failures=2).arun(range(5))
    assert ("c", 3) == (info.value.stage, info.value.item)
    assert [
        "pipeline 'p': 3 items failed, over its error budget max_failures=2"
    ] == info.value.__notes__
    [event] = [e for e in logs if e["event"] == "error_budget_exceeded"]
    assert ("pipeline", 3, 2) == (event["scope"], event["failed"], event["max_failures"])


async def test_pipeline_budget_does_not_count_embedded_failures():
    """Embedded failures are outputs the caller handles: they use no budget."""
    a = stage(name="a", errors="embed")(fails_on(1, 2, 3))
    result = await Pipeline(a, max_failures=0).arun(range(5))
    assert 3 == sum(isinstance(o, Failed) for o in result.outputs)


@pytest.mark.parametrize(
    ("bad", "error"), [(-1, ValueError), (0.5, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_pipeline_budget_must_be_a_count(bad, error):
    """Pipeline(max_failures=) takes an int >= 0 and says so: TypeError for a wrong
    type, ValueError for a wrong value."""
    a = stage(name="a", errors="collect")(fails_on(1))
    with pytest.raises(error, match=r"Pipeline max_failures= must be an int >= 0, got "):
        Pipeline(a, max_failures=bad)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"max_failures": 3},
            ValueError,
            r"stage 'f': option max_failures= must be used with errors=\"collect\" or errors=\"skip\", got 3",
        ),
        ({"errors": "embed", "max_failures": 3}, ValueError, r"used with errors="),
        (
            {"errors": "skip", "max_failures": 1.5},
            ValueError,
            r"max_failures= must be a fraction between 0 and 1, got 1.5",
        ),
        (
            {"errors": "skip", "max_failures": -1},
            ValueError,
            r"max_failures= must be an int >= 0 or a fraction, got -1",
        ),
        (
            {"errors": "skip", "max_failures": "3"},
            TypeError,
            r"max_failures= must be an int >= 0 or a fraction, got '3'",
        ),
        (
            {"errors": "ignore"},
            ValueError,
            r"option errors= must be one of 'fail_fast', 'collect', 'skip', 'embed', got 'ignore'",
        ),
        (
            {"retries": -1},
            ValueError,
            r"option retries= must be an int >= 0 or a pipeflow.Retry, got -1",
        ),
        (
            {"retries": 1.5},
            TypeError,
            r"option retries= must be an int >= 0 or a pipeflow.Retry, got 1.5",
        ),
        ({"timeout": 0}, ValueError, r"option timeout= must be a finite number > 0, got 0"),
        (
            {"dead_letter": 3},
            TypeError,
            r"option dead_letter= must be a callable or a Stage, got 3",
        ),
    ],
)
def test_error_options_are_checked_when_the_stage_is_declared(options, error, message):
    """A wrong error option fails at decoration, naming the stage, option and value."""
    with pytest.raises(error, match=message):

        @stage(**options)
        async def f(x):
            return x


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attempts": 0}, ValueError, r"attempts= must be >= 1, got 0"),
        ({"attempts": 2, "backoff": -1}, ValueError, r"backoff= must be a finite number >= 0"),
        ({"attempts": 2, "jitter": 2}, ValueError, r"jitter= must be between 0 and 1, got 2"),
        ({"attempts": 2, "on": ValueError}, None, None),
        (
            {"attempts": 2, "on": (KeyboardInterrupt,)},
            TypeError,
            r"on= must be Exception subclasses",
        ),
        ({"attempts": 2, "on": "ValueError"}, TypeError, r"on= must be Exception subclasses"),
    ],
)
def test_retry_policy_is_validated(kwargs, error, message):
    """Retry(...) refuses bad values at construction; on= takes a class or a tuple."""
    if error is None:
        assert (ValueError,) == Retry(**kwargs).on
        return
    with pytest.raises(error, match=message):
        Retry(**kwargs)


# -- source errors --------------------------------------------------------------------------


async def test_async_source_error_surfaces_as_itself():
    """An async source that raises ends the run with that exception, traceback intact."""

    async def source():
        yield 1
        yield 2
        raise ConnectionResetError("upstream went away")

    @stage(workers=2, errors="collect")
    async def work(x):
        return x

    with pytest.raises(ConnectionResetError, match="upstream went away") as info:
        await Pipeline(work).arun(source())
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "source" in frames


async def test_source_error_while_workers_are_busy_does_not_hang(autojump_clock):
    """Workers stuck in slow calls are cancelled when the source fails."""

    def source():
        yield from range(3)
        raise RuntimeError("bad input file")

    @stage(workers=3)
    async def slow(x):
        await trio.sleep(1000)

    with pytest.raises(RuntimeError, match="bad input file"):
        await Pipeline(slow).arun(source())
    assert 0.0 == trio.current_time()


async def test_source_error_while_a_breaker_holds_does_not_hang(autojump_clock):
    """A breaker holding items does not keep a failed source's run alive."""
    breaker = CircuitBreaker(min_calls=1, window=1, cooldown=1000)

    async def source():
        yield 1
        yield 2
        await trio.sleep(5)
        raise RuntimeError("source broke")

    @stage(errors="collect", breaker=breaker)
    async def down(x):
        raise ConnectionError("down")

    with pytest.raises(RuntimeError, match="source broke"):
        await Pipeline(down).arun(source())
    assert 5.0 == trio.current_time()


async def test_source_error_ends_a_stream_block():
    """In stream(), a source error cancels the consumer and is raised from the block."""

    def source():
        yield 1
        raise ValueError("corrupt record")

    @stage
    async def work(x):
        return x

    got = []

    async def consume():
        async with Pipeline(work).stream(source()) as outputs:
            async for out in outputs:
                got.append(out)

    with pytest.raises(ValueError, match="corrupt record"):
        await consume()
    assert got in ([], [1])


# -- combinations ---------------------------------------------------------------------------


async def test_retry_timeout_dead_letter_and_collect_together(autojump_clock):
    """Retries with backoff, per-attempt timeouts, a dead letter and collect compose."""
    letters = []
    starts: dict[str, list[float]] = {}

    @stage(
        workers=2,
        timeout=2,
        retries=Retry(attempts=2, backoff=1, multiplier=2),
        errors="collect",
        dead_letter=letters.append,
    )
    async def call(x):
        starts.setdefault(x, []).append(trio.current_time())
        if x == "hang":
            await trio.sleep(100)
        if x == "flaky" and len(starts[x]) < 3:
            raise ConnectionError("flaky")
        if x == "bad":
            raise ValueError("always")
        return x.upper()

    result = await Pipeline(call).arun(["ok", "hang", "flaky", "bad"])
    # One worker takes "ok" then "flaky"; the other "hang" (0, 3, 7 → gives up at 9).
    assert [0.0, 3.0, 7.0] == starts["hang"]
    assert [0.0, 1.0, 3.0] == starts["flaky"]
    assert [3.0, 4.0, 6.0] == starts["bad"]
    assert ["FLAKY", "OK"] == sorted(result.outputs)
    assert {("bad", 3, ValueError), ("hang", 3, TimeoutError)} == {
        (e.item, e.attempts, type(e.__cause__)) for e in result.errors
    }
    assert {("bad", 3), ("hang", 3)} == {(f.item, f.attempts) for f in letters}
    s = result.stats["call"]
    assert (4, 2, 2, 6) == (s.items_in, s.ok, s.failed, s.retried)
    assert 9.0 == result.elapsed
    assert_conserved(result)


async def test_retry_timeout_breaker_dead_letter_and_collect_together(autojump_clock):
    """The breaker opens on repeated failures, holds retries through its cooldown,
    lets a probe through, and closes; every failure is collected and dead-lettered."""
    letters = []
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10)

    @stage(
        timeout=1,
        retries=Retry(attempts=1, backoff=1),
        breaker=breaker,
        errors="collect",
        dead_letter=letters.append,
    )
    async def call(x):
        calls.append((x, trio.current_time()))
        if trio.current_time() < 5:
            await trio.sleep(100)  # the service hangs until t=5
        return x

    with capture_logs() as logs:
        result = await Pipeline(call).arun(["a", "b"])
    # a: times out 0→1, retry at 2 times out at 3: two failures open the breaker at 3.
    # a failed for good (2 attempts). b waits out the cooldown; its first call at 13 is
    # the half-open probe; it succeeds and closes the breaker.
    assert [("a", 0.0), ("a", 2.0), ("b", 13.0)] == calls
    assert ["b"] == result.outputs
    [err] = result.errors
    assert ("a", 2) == (err.item, err.attempts)
    assert isinstance(err.__cause__, TimeoutError)
    assert [("a", 2)] == [(f.item, f.attempts) for f in letters]
    changes = [(e["old"], e["new"]) for e in logs if e["event"] == "breaker_state_changed"]
    assert [("closed", "open"), ("open", "half_open"), ("half_open", "closed")] == changes
    assert "closed" == result.stats["call"].breaker_state
    assert 1 == result.stats["call"].retried


async def test_open_breaker_failing_items_reach_the_dead_letter_and_the_outputs(autojump_clock):
    """when_open="fail" with embed: refused items are Failed(CircuitOpen) in the outputs
    and in the dead-letter sink; the function is not called for them."""
    letters = []
    called = []
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10, when_open="fail")

    @stage(breaker=breaker, errors="embed", ordered=True, dead_letter=letters.append)
    async def call(x):
        called.append(x)
        await trio.sleep(1)
        raise ConnectionError("down")

    result = await Pipeline(call).arun(range(5))
    assert [0, 1] == called
    kinds = [type(o.error) for o in result.outputs]
    assert [ConnectionError, ConnectionError, CircuitOpen, CircuitOpen, CircuitOpen] == kinds
    assert [0, 1, 2, 3, 4] == [f.item for f in letters]
    assert 2.0 == result.elapsed
    assert 5 == result.stats["call"].failed


def test_every_public_error_name_is_exported():
    """The names the error docs use are importable from pipeflow."""
    for name in (
        "StageError",
        "TooManyFailures",
        "Failed",
        "CircuitOpen",
        "CircuitBreaker",
        "Retry",
    ):
        assert name in pipeflow.__all__


async def test_dead_letter_stage_gets_every_failure_when_fail_fast_stops(autojump_clock):
    """Three items fail at once under fail-fast with a slow dead-letter stage: the run
    stops, but each failed item still reaches the dead-letter stage (their hand-overs
    are not cancelled by the stop, and the dead-letter stage drains before the error
    is raised)."""
    got = []

    @stage(workers=1, buffer=0)
    async def sink(failed):
        await trio.sleep(1)
        got.append(failed.item)

    @stage(workers=3, dead_letter=sink)
    async def boom(x):
        await trio.sleep(1)
        raise ValueError(x)

    with pytest.raises(StageError):
        await Pipeline(boom).arun(range(3))
    assert [0, 1, 2] == sorted(got)
    assert 4.0 == trio.current_time()  # fail at 1, then three 1 s dead letters
