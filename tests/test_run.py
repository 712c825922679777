"""Running pipelines: run / arun / stream, sources, ordering, timeouts, fail-fast."""

from __future__ import annotations

import threading
import time

import pytest
import trio
import trio.testing

from pipeflow import Pipeline, StageError, stage
from pipeflow.testing import assert_nothing_left_running, running_tasks


@stage(workers=4)
async def double(x):
    return x * 2


@stage(workers=2)
def add_one(x):
    return x + 1


@stage(workers=2)
async def evens_twice(x):
    if x % 2 == 0:
        yield x
        yield x


@stage(workers=2)
def words(line):
    yield from line.split()


def test_run_returns_outputs_and_stats():
    """run() from sync code gives every output and per-stage counts."""
    result = Pipeline(double | add_one).run(range(100))
    assert sorted(x * 2 + 1 for x in range(100)) == sorted(result.outputs)
    assert (100, 100, 0, 4) == (
        result.stats["double"].items_in,
        result.stats["double"].items_out,
        result.stats["double"].failed,
        result.stats["double"].workers,
    )
    assert 2 == result.stats["add_one"].workers
    assert [] == result.errors
    assert result.elapsed > 0


def test_generators_flat_map_and_filter():
    """Generator stages emit 0..N outputs per input; counts show it."""
    result = Pipeline(evens_twice).run(range(10))
    assert [0, 0, 2, 2, 4, 4, 6, 6, 8, 8] == sorted(result.outputs)
    s = result.stats["evens_twice"]
    assert (10, 10, 5, 5) == (s.items_in, s.items_out, s.ok, s.filtered)
    result = Pipeline(words).run(["a b", "", "c"])
    assert ["a", "b", "c"] == sorted(result.outputs)


def test_plain_functions_run_in_worker_threads():
    """A plain def runs off the event-loop thread, named after its stage."""
    seen = []

    @stage(workers=2)
    def where(x):
        seen.append(threading.current_thread().name)
        return x

    Pipeline(where, name="p").run(range(4))
    assert {"pipeflow:p:where"} == set(seen)


def test_run_in_task_calls_a_cheap_sync_function_inline():
    """run_in='task' calls a plain function in the event loop."""
    loop_thread = threading.current_thread()

    @stage(run_in="task")
    def inline(x):
        assert threading.current_thread() is loop_thread
        return -x

    assert [0, -1, -2] == Pipeline(inline).run(range(3)).outputs


def test_collect_false_keeps_no_outputs():
    """collect=False counts everything and keeps nothing."""
    result = Pipeline(double).run(range(1000), collect=False)
    assert [] == result.outputs
    assert 1000 == result.stats["double"].items_out


async def test_arun_inside_trio():
    """arun is the same run from Trio code."""
    result = await Pipeline(double).arun([1, 2, 3])
    assert [2, 4, 6] == sorted(result.outputs)


async def test_async_iterable_and_channel_sources():
    """Async generators and Trio receive channels are sources too."""

    async def agen():
        for i in range(5):
            yield i

    assert [0, 2, 4, 6, 8] == sorted((await Pipeline(double).arun(agen())).outputs)
    send, recv = trio.open_memory_channel(0)

    async def feed():
        async with send:
            for i in range(3):
                await send.send(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        result = await Pipeline(double).arun(recv)
    assert [0, 2, 4] == sorted(result.outputs)


def test_source_that_is_not_iterable_is_refused():
    """A non-iterable source is a TypeError that names it."""
    with pytest.raises(TypeError, match=r"source must be an iterable.*got 42 \(int\)"):
        Pipeline(double).run(42)


async def test_sync_source_is_pulled_lazily_in_bounded_memory():
    """An endless generator is pulled only as fast as the pipeline takes items."""
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    gate = trio.Event()

    @stage(workers=2, buffer=3)
    async def slow(x):
        await gate.wait()
        return x

    async with Pipeline(slow).stream(endless()) as outputs:
        await trio.testing.wait_all_tasks_blocked()
        # 2 in the workers, 3 in the buffer, 1 in the source's blocked send.
        assert 6 == pulled
        gate.set()
        taken = [await outputs.receive() for _ in range(50)]
    assert 50 == len(taken)
    assert pulled < 70


async def test_async_source_is_closed_on_every_exit_path():
    """An async generator source is closed when the pipeline fails."""
    closed = []

    async def source():
        try:
            for i in range(1000):
                yield i
        finally:
            closed.append(True)

    @stage
    async def boom(x):
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(StageError):
        await Pipeline(boom).arun(source())
    assert [True] == closed


async def test_stream_yields_outputs_as_they_come(autojump_clock):
    """stream() hands out each output as soon as it leaves the last stage."""

    @stage(workers=1)
    async def tick(x):
        await trio.sleep(1)
        return x

    times = []
    async with Pipeline(tick).stream(range(3)) as outputs:
        async for out in outputs:
            times.append((out, trio.current_time()))
    assert [(0, 1.0), (1, 2.0), (2, 3.0)] == times
    assert outputs.result is not None
    assert 3 == outputs.result.stats["tick"].items_out


async def test_leaving_stream_early_cancels_cleanly(autojump_clock):
    """Breaking out of stream() stops every worker, with no error."""

    @stage(workers=3)
    async def slow(x):
        await trio.sleep(1)
        return x

    async with Pipeline(slow).stream(range(10**9)) as outputs:
        async for out in outputs:
            if out >= 5:
                break
    assert running_tasks() == []
    assert trio.current_time() < 5


def test_fail_fast_raises_stage_error_with_cause():
    """The first failure stops the run and surfaces as StageError, not a group."""

    @stage(workers=4)
    async def picky(x):
        if x == 7:
            raise KeyError("no sevens")
        return x

    with pytest.raises(StageError) as info:
        Pipeline(picky).run(range(100))
    err = info.value
    assert ("picky", 7, 1) == (err.stage, err.item, err.attempts)
    assert isinstance(err.__cause__, KeyError)
    assert err.__cause__.__traceback__ is not None
    assert "stage 'picky' failed on item 7: KeyError: 'no sevens'" == str(err)


async def test_fail_fast_cancels_every_worker_at_once(autojump_clock):
    """Other stages' workers are cancelled the moment a stage fails."""
    finished = []

    @stage(workers=2)
    async def fails_on_two(x):
        if x == 2:
            raise RuntimeError("down")
        return x

    @stage(workers=2)
    async def long(x):
        await trio.sleep(100)
        finished.append(x)

    async def source():
        yield 1
        await trio.sleep(1)
        yield 2

    with pytest.raises(StageError):
        await Pipeline(fails_on_two | long).arun(source())
    assert [] == finished
    assert 1.0 == trio.current_time()
    assert_nothing_left_running()


def test_source_errors_surface_as_themselves():
    """An exception from the source ends the run with that exception."""

    def bad_source():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        Pipeline(double).run(bad_source())


async def test_timeout_is_per_attempt_and_really_cancels(autojump_clock):
    """timeout= cancels the attempt at the deadline; the code after the sleep never runs."""
    after = []

    @stage(timeout=2)
    async def hangs(x):
        await trio.sleep(10)
        after.append(x)

    with pytest.raises(StageError) as info:
        await Pipeline(hangs).arun([1])
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "timed out after 2s" in str(info.value)
    assert 2.0 == trio.current_time()
    assert [] == after


async def test_ordered_stage_emits_in_input_order_and_keeps_workers_busy(autojump_clock):
    """A slow head does not stall the others: they keep working inside the window."""

    @stage(workers=4, ordered=True)
    async def uneven(x):
        await trio.sleep(10 if x == 0 else 1)
        return x

    result = await Pipeline(uneven).arun(range(13))
    assert list(range(13)) == result.outputs
    # Items 1..12 run on three workers while item 0 takes 10 s: done at t=10, not t=13.
    assert 10.0 == result.elapsed


async def test_unordered_stage_emits_as_completed(autojump_clock):
    """Without ordered=True, outputs leave as they finish."""

    @stage(workers=3)
    async def reverse_delay(x):
        await trio.sleep(3 - x)
        return x

    assert [2, 1, 0] == (await Pipeline(reverse_delay).arun(range(3))).outputs


async def test_ordered_flat_map_keeps_order_of_children(autojump_clock):
    """Ordered generator stages keep each item's outputs together, in input order."""

    @stage(workers=3, ordered=True)
    async def expand(x):
        await trio.sleep(3 - x % 3)
        for i in range(x % 3):
            yield (x, i)

    result = await Pipeline(expand).arun(range(6))
    assert [(1, 0), (2, 0), (2, 1), (4, 0), (5, 0), (5, 1)] == result.outputs


async def test_bounded_buffers_apply_backpressure():
    """A stalled last stage holds the whole pipeline within its buffers."""
    gate = trio.Event()
    seen = []

    @stage(workers=1, buffer=0)
    async def first(x):
        seen.append(x)
        return x

    @stage(workers=1, buffer=1)
    async def stalled(x):
        await gate.wait()
        return x

    async with trio.open_nursery() as nursery:
        nursery.start_soon(Pipeline(first | stalled).arun, range(100))
        await trio.testing.wait_all_tasks_blocked()
        # stalled holds 1, its buffer 1, first's worker 1 (blocked sending).
        assert [0, 1, 2] == seen
        gate.set()
    assert 100 == len(seen)


async def test_outer_cancellation_stops_the_run_and_leaves_nothing(autojump_clock):
    """Cancelling arun from outside cancels every worker; nothing is left running."""

    @stage(workers=5)
    async def forever(x):
        await trio.sleep_forever()

    with trio.move_on_after(3):
        await Pipeline(forever).arun(range(100))
    assert 3.0 == trio.current_time()
    assert_nothing_left_running()


def test_a_thread_stage_whose_items_turn_slow_spreads_them_over_its_workers():
    """A plain-function stage with 4 workers, after hundreds of instant items: 8 items of
    0.2 s each arriving at once do not run one after another in one worker's thread
    (1.6 s): the first slow one sends the rest back to the idle workers."""

    @stage(workers=4)
    def work(x):
        if x < 0:
            time.sleep(0.2)
        return x

    async def main():
        async with Pipeline(work).open() as flow:
            for i in range(300):
                await flow.send(i)
            await trio.sleep(0.1)
            start = time.monotonic()
            for i in range(-8, 0):
                await flow.send(i)
        return time.monotonic() - start, flow.result

    elapsed, result = trio.run(main)
    assert 308 == result.stats["work"].ok
    assert elapsed < 1.2, elapsed


async def test_a_source_that_waited_for_an_item_lets_the_woken_worker_start_first(autojump_clock):
    """At low load each item comes after the source waited for it (a timer, I/O) and a
    worker waits for it. The source's task steps aside after handing such an item over,
    so that the worker can start on it before the source is asked for the next (which
    may keep the loop busy as long again): also when two items come close together
    (here 0.1 ms apart, as a paced source's do when a timer fires late). The two tasks
    then run in the scheduler's (random) order: over 20 such items the worker started
    first for some; a source task that went straight on would never let it."""
    events: list[tuple[str, int]] = []

    async def source():
        for i in range(40):
            events.append(("asked", i))
            await trio.sleep(0.001 if i % 2 == 0 else 0.0001)
            yield i

    @stage(workers=2)
    async def work(x):
        events.append(("start", x))
        return x

    async with Pipeline(work).stream(source()) as outputs:
        got = [x async for x in outputs]
    assert got == list(range(40))
    close_ones = range(1, 39, 2)  # each 0.1 ms after the one before it
    first = [i for i in close_ones if events.index(("start", i)) < events.index(("asked", i + 1))]
    assert first, events


def test_a_source_with_its_items_at_hand_is_not_stepped_aside_per_item():
    """An async source that has its items at hand (no waiting) hands them over without a
    scheduler round each: its task takes far fewer steps than there are items (on the
    real clock: what "at hand" means is measured)."""
    steps = 0

    class CountSourceSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal steps
            if task.name.endswith(":source"):
                steps += 1

    async def source():
        for i in range(5_000):
            yield i

    async def main() -> list[int]:
        trio.lowlevel.add_instrument(CountSourceSteps())
        async with Pipeline(double).stream(source()) as outputs:
            return [x async for x in outputs]

    assert trio.run(main) == [2 * i for i in range(5_000)]
    assert steps < 5_000 // 4, steps


async def test_an_item_that_fails_alone_is_timed_and_counted_as_one_in_a_chunk(autojump_clock):
    """At low load each item reaches its stage alone and takes a short path through the
    worker (no chunk set-up); one that fails there goes the general way with its call
    already made: its time is still busy time and a duration, the others' too, and the
    counts add up as for items that come together."""

    async def one_at_a_time():
        for i in range(6):
            await trio.sleep(1.0)
            yield i

    @stage(workers=2, errors="collect")
    async def flaky(x):
        await trio.sleep(0.25)
        if x % 3 == 0:
            raise ValueError(f"bad {x}")
        return x

    result = await Pipeline(flaky).arun(one_at_a_time())
    s = result.stats["flaky"]
    assert sorted(result.outputs) == [1, 2, 4, 5]
    assert [str(e.error) for e in result.errors] == ["bad 0", "bad 3"]
    assert (s.items_in, s.ok, s.failed, s.cancelled) == (6, 4, 2, 0)
    assert (s.busy_seconds, s.duration_mean, s.duration_max) == (1.5, 0.25, 0.25)
    assert s.queue_wait_mean == 0.0
