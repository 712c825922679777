"""Running on (pipeflow/_run/runon.py): at low load a worker takes its item on through
the next stages' functions itself when they have a worker with nothing to do, instead of
waking that worker for a scheduler round per hop. What a user sees must not change:
outputs, counts, each stage's statistics, its error policy, ``workers=`` as the bound on
a stage's calls at once, and the accounting after a stop."""

from __future__ import annotations

import time

import pytest
import trio

from pipeflow import Failed, Pipeline, StageError, stage
from pipeflow.testing import assert_nothing_left_running
from tests.test_runner_hostile import assert_balanced


async def trickle(n, gap=0.01):
    """``n`` items, each when the pipeline is idle again."""
    for i in range(n):
        await trio.sleep(gap)
        yield i


def task_name():
    return trio.lowlevel.current_task().name


def hangs_on(bad):
    """A second stage of 2 workers whose call on item ``bad`` never ends by itself."""

    @stage(workers=2)
    async def second(x):
        if x == bad:
            await trio.sleep_forever()
        return x

    return second


def passing(name, *, workers, buffer=None):
    """A stage that passes its items on: one that runs on into the next."""

    async def same(x):
        return x

    return stage(workers=workers, buffer=buffer, name=name)(same)


async def test_idle_quick_stages_run_in_the_first_stages_worker(autojump_clock):
    """Items that come when every stage is idle go through the three stages in the
    first stage's worker, counted in each stage's own figures."""
    ran_in = {"a": [], "b": [], "c": []}

    def recorder(name):
        async def f(x):
            ran_in[name].append(task_name())
            return x + 1

        return stage(workers=2, name=name)(f)

    pipeline = Pipeline(recorder("a") | recorder("b") | recorder("c"))
    async with pipeline.stream(trickle(20)) as outputs:
        got = [x async for x in outputs]
    result = outputs.result
    assert got == [i + 3 for i in range(20)]
    # Each stage's first item goes to its own worker (its items are not yet known to be
    # quick); from then on, stage a's worker takes each item through b and c itself.
    assert [n.rsplit(":", 1)[1] for n in ran_in["a"]] == ["a"] * 20
    assert [n.rsplit(":", 1)[1] for n in ran_in["b"]] == ["b"] + ["a"] * 19
    assert [n.rsplit(":", 1)[1] for n in ran_in["c"]] == ["c"] + ["a"] * 19
    for name in "abc":
        s = result.stats[name]
        assert (s.items_in, s.ok, s.items_out, s.failed) == (20, 20, 20, 0), s
        sample = pipeline.samples()[name]
        assert sum(sample.duration_counts) == 20, sample  # every call timed, wherever
        assert sum(sample.wait_counts) == 20, sample
    assert_balanced(result, pipeline)


async def test_a_slow_stage_is_not_run_on(autojump_clock):
    """A stage whose items take long (I/O) is never run on: its own workers spread them."""
    ran_in = []
    fast = passing("fast", workers=4)

    @stage(workers=1)
    async def slow(x):
        ran_in.append(task_name())
        await trio.sleep(1)
        return x

    result = await Pipeline(fast | slow).arun(range(10))
    assert sorted(result.outputs) == list(range(10))
    assert all(n.endswith(":slow") for n in ran_in)
    assert_balanced(result)


async def test_a_quick_stage_whose_worker_is_busy_is_not_run_on(autojump_clock):
    """A quick stage whose one worker is away (waiting for room before a slow reader)
    has no worker waiting: its items queue for that worker, as on any edge."""
    ran_in = []
    first = passing("first", workers=1)

    @stage(workers=1)
    async def second(x):
        ran_in.append(task_name().rsplit(":", 1)[1])
        return x

    pipeline = Pipeline(first | second)
    async with pipeline.stream(trickle(8), buffer=1) as outputs:
        got = []
        async for x in outputs:
            got.append(x)
            await trio.sleep(1)  # a slow reader: second's worker waits for room
    assert got == list(range(8))
    # Item 0 finds second not yet quick; 1 and 2 find its worker waiting (2 then finds
    # no room after it and goes to that worker); from then on the worker is away.
    assert ran_in == ["second", "first", "first", "second", "second", "second", "second", "second"]
    assert_balanced(outputs.result, pipeline)


@pytest.mark.parametrize("workers", [1, 3])
async def test_a_stage_that_waits_after_all_keeps_its_bound(workers, autojump_clock):
    """A cache-like stage: quick for most items, waiting (I/O) for some. A call run on
    that turns out to wait is held by one of the stage's own workers, so the stage never
    has more calls at once than ``workers=``; the stage's statistics count it."""
    calls = 0
    most = 0
    ran_in = []

    first = passing("first", workers=4)

    @stage(workers=workers)
    async def cache(x):
        nonlocal calls, most
        calls += 1
        most = max(most, calls)
        ran_in.append(task_name())
        try:
            if x % 5 == 4:
                await trio.sleep(0.05)  # a miss: longer than the gaps between items
            return x * 10
        finally:
            calls -= 1

    pipeline = Pipeline(first | cache)
    with trio.fail_after(60):  # a held call never ended: seconds, not pytest's timeout
        async with pipeline.stream(trickle(40, gap=0.001)) as outputs:
            got = [x async for x in outputs]
    result = outputs.result
    assert sorted(got) == [x * 10 for x in range(40)]
    assert most <= workers
    assert any(n.endswith(":first") for n in ran_in)  # it did run on
    s = result.stats["cache"]
    assert (s.items_in, s.ok, s.items_out) == (40, 40, 40), s
    assert sum(pipeline.samples()["cache"].duration_counts) == 40
    assert s.duration_max >= 0.05  # the misses' waits, counted in the stage's latency
    assert_balanced(result, pipeline)


async def test_a_waiting_call_run_on_is_shown_in_its_own_stage(autojump_clock):
    """While a call begun by the stage before waits, the live views show one of its own
    stage's workers calling that item, and the stage busy with it."""
    seen = {}

    first = passing("first", workers=1)

    @stage(workers=2)
    async def second(x):
        if x == 3:
            await trio.sleep(1)
        return x

    pipeline = Pipeline(first | second)

    async def watch():
        await trio.sleep(0.045)  # item 3 came at 0.04 and waits in second until 1.04
        seen["workers"] = [(w.stage, w.state, w.item) for w in pipeline.current_workers()]
        seen["samples"] = pipeline.samples()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with pipeline.stream(trickle(5)) as outputs:
            got = [x async for x in outputs]
    # Item 4 went on while 3 waited: the first stage's worker that began 3's call in
    # second sees it to its end, and a new worker took its seat in the first stage.
    assert got == [0, 1, 2, 4, 3]
    assert sorted(seen["workers"]) == [
        ("first", "waiting", None),
        ("second", "calling", "3"),
        ("second", "waiting", None),
    ], seen
    first, second = seen["samples"]["first"], seen["samples"]["second"]
    assert (first.workers, first.busy_workers, first.inflight) == (1, 0, 0), first
    assert (second.workers, second.busy_workers, second.inflight) == (2, 1, 1), second
    assert outputs.result.stats["first"].workers == 1
    assert_balanced(outputs.result, pipeline)


async def test_a_failure_run_on_is_its_own_stages_under_fail_fast(autojump_clock):
    """A call run on that raises is its own stage's failure: fail-fast names that stage
    and the item, and counts it there."""
    first = passing("first", workers=2)

    @stage(workers=2)
    async def second(x):
        if x == 6:
            raise ValueError("bad six")
        return x

    pipeline = Pipeline(first | second)
    with pytest.raises(StageError) as info:
        await pipeline.arun(trickle(10))
    assert_nothing_left_running()
    err = info.value
    assert (err.stage, err.item, type(err.__cause__)) == ("second", 6, ValueError)
    assert err.result.stats["second"].failed == 1
    assert err.result.stats["first"].failed == 0
    assert_balanced(err.result, pipeline)


@pytest.mark.parametrize("waits", [False, True], ids=["at-once", "after-waiting"])
@pytest.mark.parametrize("errors", ["skip", "collect", "embed"])
async def test_a_failure_run_on_goes_by_its_stages_policy(errors, waits, autojump_clock):
    """A call run on that raises, at once or after it waited (held by the stage's own
    worker meanwhile), goes by its own stage's policy and dead letters."""
    dead = []
    failed_in = {}
    first = passing("first", workers=2)

    @stage(workers=2, errors=errors, dead_letter=dead.append)
    async def second(x):
        if x % 4 == 3:
            failed_in[x] = task_name().rsplit(":", 1)[1]
            if waits:
                await trio.sleep(0.001)
            raise ValueError(f"bad {x}")
        return x

    @stage(workers=2)
    async def third(x):
        return x

    pipeline = Pipeline(first | second | third)
    result = await pipeline.arun(trickle(12))
    s = result.stats["second"]
    assert (s.items_in, s.ok, s.failed) == (12, 9, 3), s
    assert failed_in == {3: "first", 7: "first", 11: "first"}  # each call was run on
    assert sorted(f.item for f in dead) == [3, 7, 11]
    assert {f.stage for f in dead} == {"second"}
    outputs = sorted(result.outputs, key=lambda x: x.item if isinstance(x, Failed) else x)
    if errors == "embed":
        assert [x.item if isinstance(x, Failed) else x for x in outputs] == list(range(12))
    else:
        assert outputs == [x for x in range(12) if x % 4 != 3]
    if errors == "collect":
        assert sorted(e.item for e in result.errors) == [3, 7, 11]
        assert {e.stage for e in result.errors} == {"second"}
    assert_balanced(result, pipeline)


async def test_an_outer_cancel_during_a_waiting_call_run_on(autojump_clock):
    """The stop takes the item from the stage whose call it was: cancelled there, and
    listed once as (stage, item)."""

    pipeline = Pipeline(passing("first", workers=1) | hangs_on(4))
    with trio.fail_after(60), trio.move_on_after(1):
        async with pipeline.stream(trickle(10)) as outputs:
            async for _ in outputs:
                pass
    assert_nothing_left_running()
    result = outputs.result
    assert ("second", 4) in result.unfinished
    assert result.unfinished.count(("second", 4)) == 1
    assert result.stats["second"].cancelled >= 1
    assert result.stats["first"].cancelled == 0
    assert_balanced(result)


async def test_no_room_after_a_stage_run_on_waits_in_that_stage(autojump_clock):
    """A result with no room after its stage (a reader that does not read) goes to the
    stage's own worker, which waits for room as for its own result: blocked time in that
    stage, every item delivered in the end."""

    first = passing("first", workers=1)

    @stage(workers=1)
    async def second(x):
        return x

    pipeline = Pipeline(first | second)
    got = []
    async with pipeline.stream(trickle(10), buffer=1) as outputs:
        async for x in outputs:
            got.append(x)
            await trio.sleep(0.1)  # slower than the source
    assert got == list(range(10))
    result = outputs.result
    assert result.stats["second"].blocked_seconds > 0
    assert_balanced(result, pipeline)


async def test_a_call_run_on_that_ends_shielded_is_counted_done(autojump_clock):
    """A commit shielded from cancellation, begun by the stage before's worker: an
    outer cancel comes while it waits. The commit ends, so its item is ok and handed
    on, as when the stage's own worker made the call; not listed unfinished."""
    committed = []

    first = passing("first", workers=1)

    @stage(workers=2)
    async def commit(x):
        if x == 5:
            with trio.CancelScope(shield=True):
                await trio.sleep(1)  # the commit must finish
        committed.append(x)
        return x

    pipeline = Pipeline(first | commit)
    with trio.move_on_after(0.5):  # while item 5's commit waits
        async with pipeline.stream(trickle(10)) as outputs:
            async for _ in outputs:
                pass
    assert_nothing_left_running()
    result = outputs.result
    assert sorted(committed) == list(range(10))
    assert result.unfinished == []
    s = result.stats["commit"]
    assert (s.items_in, s.ok, s.cancelled) == (10, 10, 0), s
    assert_balanced(result, pipeline)


@pytest.mark.parametrize("then", ["wait", "raise"])
async def test_a_call_run_on_that_cancels_the_run(then, autojump_clock):
    """The function, run on, cancels a scope around the run, which takes the stage's
    waiting workers away before the call is handed to one: a new worker of the stage
    deals with it. Waiting, it ends in the cancellation alone; raising, its stage's
    policy (fail-fast) says so."""

    first = passing("first", workers=2)

    @stage(workers=2)
    async def second(x):
        if x == 5:
            scope.cancel()
            if then == "wait":
                await trio.lowlevel.checkpoint()
            else:
                raise ValueError("after the cancel")
        return x

    pipeline = Pipeline(first | second)
    with trio.CancelScope() as scope:
        if then == "wait":
            await pipeline.arun(trickle(10))
        else:
            with pytest.raises(StageError) as info:
                await pipeline.arun(trickle(10))
            assert (info.value.stage, info.value.item) == ("second", 5)
            assert info.value.result.stats["second"].workers == 2  # no worker more
            assert_balanced(info.value.result, pipeline)
    assert scope.cancelled_caught == (then == "wait")
    assert_nothing_left_running()


async def test_leaving_stream_early_while_a_call_run_on_waits(autojump_clock):
    """The reader leaves while a call begun by an earlier stage waits: the call is
    ended in the task that began it, its item is the stage's, unfinished, and no task
    is left running."""
    pipeline = Pipeline(passing("first", workers=1) | hangs_on(4))
    async with pipeline.stream(trickle(10)) as outputs:
        async for x in outputs:
            if x == 6:  # item 4 waits in second by now
                break
    assert_nothing_left_running()
    result = outputs.result
    assert result.unfinished.count(("second", 4)) == 1
    assert_balanced(result)


def test_a_worker_that_waited_since_before_its_stage_was_quick_takes_a_burst():
    """The second stage's workers park before its items are known to be quick (one at
    a time); then a burst comes in one hand-over, and the edge, its items now quick,
    wakes one worker for all of it. That worker takes the burst, not one item: item 2's
    call waits 3 s, and the items after it must not wait behind it while the other
    worker stays parked. (Trio runs a round's tasks in either order, so it is tried
    several times; on the code before, it failed about one time in two.)"""

    async def source():
        yield 0
        await trio.sleep(0.01)
        yield 1  # alone: run on, so the worker that parked first is still parked
        await trio.sleep(0.01)
        for i in range(2, 10):
            yield i  # queued in front of the first stage, handed on as one chunk

    first = passing("first", workers=1, buffer=8)

    @stage(workers=2)
    async def second(x):
        if x == 2:
            await trio.sleep(3)
        done_at[x] = trio.current_time()
        return x

    for _ in range(12):
        done_at = {}
        result = trio.run(
            Pipeline(first | second).arun,
            source(),
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
        assert sorted(result.outputs) == list(range(10))
        assert max(t for x, t in done_at.items() if x != 2) < 1, done_at


async def test_a_seat_passed_is_never_empty_in_the_live_views(autojump_clock):
    """While a worker of the first stage leaves it to see a call of the second to its
    end, and a new worker takes its seat, every scheduler round shows the first stage
    with as many workers in ``current_workers()`` as its worker gauge says."""
    first = passing("first", workers=1)

    @stage(workers=2)
    async def second(x):
        if x % 3 == 2:
            await trio.sleep(0.005)
        return x

    pipeline = Pipeline(first | second)
    disagree = []
    steps = 0

    class Watch(trio.abc.Instrument):
        """Reads the views after every task step, as a page could in any round."""

        def after_task_step(self, task):
            nonlocal steps
            samples = pipeline.samples()
            if "first" in samples:
                steps += 1
                shown = [w for w in pipeline.current_workers() if w.stage == "first"]
                if samples["first"].workers != len(shown):
                    disagree.append((trio.current_time(), samples["first"].workers, shown))

    watch = Watch()
    trio.lowlevel.add_instrument(watch)
    try:
        result = await pipeline.arun(trickle(8))
    finally:
        trio.lowlevel.remove_instrument(watch)
    assert sorted(result.outputs) == list(range(8))
    assert result.stats["second"].duration_max > 0.004  # some calls waited: seats passed
    assert steps > 20
    assert disagree == []


async def test_ordered_stages_are_not_run_on(autojump_clock):
    """Ordered stages keep their own workers (the order is restored once, after the
    last of them): none is run on, whatever its place in the group."""
    ran_in = {}

    def ordered(name):
        async def f(x):
            ran_in.setdefault(name, []).append(task_name().rsplit(":", 1)[1])
            return x

        return stage(workers=2, ordered=True, name=name)(f)

    pipeline = Pipeline(ordered("o1") | ordered("o2") | ordered("o3") | ordered("o4"))
    result = await pipeline.arun(trickle(10))
    assert result.outputs == list(range(10))
    assert ran_in == {name: [name] * 10 for name in ("o1", "o2", "o3", "o4")}
    assert_balanced(result, pipeline)


async def test_a_call_handed_over_after_it_began_did_not_queue(autojump_clock):
    """A call run on that waits is held by its stage's worker from when it began: it
    queued for no time in that stage, however long the item spent before."""

    @stage(workers=1)
    async def first(x):
        await trio.sleep(0.002)  # each item spends 2 ms in the first stage
        return x

    @stage(workers=2)
    async def second(x):
        if x % 3 == 2:
            await trio.sleep(0.01)  # waits: held by a worker of second
        return x

    with trio.fail_after(10):
        result = await Pipeline(first | second).arun(trickle(9))
    assert sorted(result.outputs) == list(range(9))
    assert result.stats["second"].queue_wait_p99 < 0.001, result.stats["second"]


def test_a_call_run_on_that_turns_slow_makes_its_stage_take_items_itself():
    """A call run on that takes long without waiting (CPU work: real time, so the
    real clock) marks its stage not quick: the next item goes to the stage's own
    worker, not run on, until an item of its own is quick again."""
    ran_in = []

    async def source():
        for i in range(10):
            await trio.sleep(0.005)
            yield i

    first = passing("first", workers=1)

    @stage(workers=1)
    async def second(x):
        ran_in.append(task_name().rsplit(":", 1)[1])
        if x == 5:
            time.sleep(0.002)  # noqa: ASYNC251  # blocking on purpose: work, not a wait
        return x

    result = trio.run(Pipeline(first | second).arun, source())
    assert sorted(result.outputs) == list(range(10))
    assert "first" in ran_in  # quick items were run on (5 too, unless the machine
    # made one of those before it slow: the real clock)
    assert ran_in[6] == "second"  # after a slow one, the stage's own worker
