"""Accounting after any stop: a fail-fast failure, an outer cancellation, a signal past
the grace period, leaving ``stream()`` or ``open()`` early. Every stage's final stats
keep ``items_in == ok + filtered + failed + dropped + cancelled``; what a stop took from
a worker or a queue is in ``RunResult.unfinished``; and the cancellation paths raise
nothing but the cancellation."""

from __future__ import annotations

import contextlib
import os
import random
import signal

import pytest
import trio

from pipeflow import Interrupted, Pipeline, PipelineClosed, StageError, stage
from pipeflow.testing import assert_nothing_left_running
from tests.test_abc import ListSource


def assert_conserved(result):
    """The law of conservation, for every stage, and nothing left in flight."""
    for s in result.stats.values():
        assert s.items_in == s.ok + s.filtered + s.failed + s.dropped + s.cancelled, s
        assert 0 == s.inflight, s
    cancelled = {name: s.cancelled for name, s in result.stats.items()}
    listed = {name: 0 for name in result.stats}
    for name, _ in result.unfinished:
        listed[name] += 1
    assert cancelled == listed


async def feed_until_refused(flow, refused):
    """Send 0, 1, 2, ... into ``flow`` until it refuses; what it said, into ``refused``."""
    i = 0
    while True:
        try:
            await flow.send(i)
        except PipelineClosed as exc:
            refused.append(str(exc))
            return
        i += 1


def slow_pipeline(seconds=1.0):
    @stage(workers=3)
    async def first(x):
        await trio.sleep(seconds)
        return x

    @stage(workers=2, buffer=4)
    async def second(x):
        await trio.sleep(seconds)
        return x

    return Pipeline(first | second)


async def test_fail_fast_counts_what_the_stop_took_as_cancelled(autojump_clock):
    """Item 4 fails at t=1; the items in other workers and queues at that moment are
    cancelled, listed as unfinished, and every stage balances."""

    @stage(workers=3)
    async def check(x):
        await trio.sleep(1 + x % 3)
        if x == 4:
            raise ValueError(x)
        return x

    @stage(workers=2)
    async def after(x):
        await trio.sleep(5)
        return x

    with pytest.raises(StageError) as info:
        await Pipeline(check | after).arun(range(20))
    result = info.value.result
    assert_conserved(result)
    s = result.stats["check"]
    assert 1 == s.failed
    assert s.cancelled > 0
    assert ("check", 4) not in result.unfinished
    # Every source item that went in is accounted for exactly once somewhere.
    taken = {item for _, item in result.unfinished}
    assert len(taken) == len(result.unfinished)


async def test_outer_cancellation_sets_the_stream_result_and_balances(autojump_clock):
    """Cancelled from outside mid-run, stream() still sets outputs.result, and what the
    cancellation took is counted and listed."""
    pipeline = slow_pipeline()
    outputs = None
    read = []
    with trio.move_on_after(2.5):
        async with pipeline.stream(range(50)) as outputs:
            async for out in outputs:
                read.append(out)
    assert outputs is not None
    assert outputs.result is not None
    result = outputs.result
    assert_conserved(result)
    assert result.unfinished
    assert 2.5 == trio.current_time()
    assert_nothing_left_running()


async def test_a_stop_during_a_rate_limit_wait_counts_it_as_throttled(autojump_clock):
    """A wait for a token that a stop ends is throttled time, not busy time: the stage
    did no work, and must not look like the bottleneck in the stopped run's figures."""

    @stage(rate=1.0)
    async def paced(x):
        return x

    with trio.move_on_after(0.5):
        async with Pipeline(paced).stream(range(3)) as outputs:
            async for _ in outputs:
                pass
    assert outputs.result is not None
    s = outputs.result.stats["paced"]
    # Item 0 takes the one token at 0; item 1 waits for the next (due at 1.0) until
    # the stop at 0.5; item 2 never leaves the queue.
    assert (1, 2) == (s.ok, s.cancelled)
    assert (0.5, 0.0) == (s.throttled_seconds, s.busy_seconds)


async def test_leaving_stream_early_lists_the_unfinished_items(autojump_clock):
    """A reader that stops after 3 outputs cancels the run; the items in flight are
    cancelled, and the outputs never read are neither acked nor lost from the counts."""
    pipeline = slow_pipeline()
    async with pipeline.stream(range(100)) as outputs:
        async for out in outputs:
            if out == 2:
                break
    result = outputs.result
    assert_conserved(result)
    assert {name for name, _ in result.unfinished} <= {"first", "second"}
    assert result.stats["first"].items_in < 100  # the source was read lazily


async def test_open_cancelled_from_outside_counts_the_queued_items(autojump_clock):
    """Items accepted by open() and still queued when the block is cancelled are counted
    as cancelled, and flow.result is set."""
    pipeline = slow_pipeline()
    flow = None
    with trio.move_on_after(1.5):
        async with pipeline.open() as flow:
            for i in range(8):
                await flow.send(i)
            await trio.sleep_forever()
    assert flow is not None
    assert flow.result is not None
    result = flow.result
    assert_conserved(result)
    assert 8 == result.stats["first"].items_in
    assert sorted(item for _, item in result.unfinished) == list(range(8))


async def test_a_signal_past_the_grace_period_balances(autojump_clock):
    """SIGINT with a grace period shorter than the items: Interrupted carries a result
    whose stages balance and whose unfinished items are listed."""
    pipeline = slow_pipeline(seconds=10)

    async def interrupt():
        await trio.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(interrupt)
        with pytest.raises(Interrupted) as info:
            await pipeline.arun(range(30), grace=2.0, handle_signals=True)
    result = info.value.result
    assert_conserved(result)
    # 3 mid-item in its workers, 3 in its queue, 1 the source was handing over.
    assert 7 == result.stats["first"].cancelled
    assert [0, 1, 2, 3, 4, 5, 6] == sorted(item for _, item in result.unfinished)
    assert 3.0 == trio.current_time()


async def test_flow_feeding_after_a_fail_fast_stop_raises_pipeline_closed(autojump_clock):
    """Once the run has stopped on a failure, send, send_nowait and offer from another
    task raise PipelineClosed naming the failure, not a Trio resource error."""

    @stage
    async def picky(x):
        if x == "bad":
            raise ValueError("no bad items")
        await trio.sleep(1)
        return x

    errors = []

    async def feeder(flow):
        await trio.sleep(5)  # after the failure
        for call in (flow.send, flow.send_nowait, flow.offer):
            try:
                result = call("x")
                if hasattr(result, "__await__"):
                    await result
            except PipelineClosed as exc:
                errors.append(str(exc))

    async with trio.open_nursery() as outer:
        with pytest.raises(StageError):  # noqa: PT012 - leaving the block raises it
            async with Pipeline(picky, name="p").open() as flow:
                outer.start_soon(feeder, flow)
                await flow.send("bad")
                await trio.sleep(10)
    assert 3 == len(errors)
    for message in errors:
        assert message.startswith("pipeline 'p' takes no more items: it stopped on a failure")
        assert "no bad items" in message


async def test_feeding_a_closed_flow_raises_pipeline_closed(autojump_clock):
    """After flow.close(), the flow refuses items with PipelineClosed."""

    @stage
    async def ok(x):
        return x

    async with Pipeline(ok).open() as flow:
        flow.close()
        with pytest.raises(PipelineClosed, match="its input is closed"):
            flow.offer(1)


@pytest.mark.parametrize("through_a_nursery", [False, True])
async def test_a_feeder_outside_a_cancelled_open_block_is_told_it_was_cancelled(
    through_a_nursery, autojump_clock
):
    """A task outside the ``open()`` block feeds it; the block is cancelled. The feeder's
    next send is refused with PipelineClosed saying the block was cancelled (before: "its
    input is closed (flow.close(), ...)", as if the program had closed it); also when
    the cancellation comes out of a nursery in the block, as a group of Cancelled only."""

    @stage(workers=1, buffer=1)
    async def slow(x):
        await trio.sleep(0.05)
        return x

    refused = []
    async with trio.open_nursery() as outside:
        with trio.move_on_after(0.2):
            async with Pipeline(slow, name="p").open() as flow:
                outside.start_soon(feed_until_refused, flow, refused)
                if through_a_nursery:
                    async with trio.open_nursery() as inside:
                        inside.start_soon(trio.sleep_forever)
                        inside.start_soon(trio.sleep_forever)
                else:
                    await trio.sleep_forever()
    assert ["pipeline 'p' takes no more items: the async with block was cancelled"] == refused
    assert_conserved(flow.result)


@pytest.mark.parametrize("seed", range(40))
async def test_cancelling_a_keyed_run_at_random_raises_only_the_cancellation(seed, autojump_clock):
    """A run with a key= stage cancelled at a random moment: no BrokenResourceError (the
    key router handing an item to a worker already cancelled), and the stages balance."""
    rng = random.Random(seed)

    @stage(workers=4, key=lambda x: x % 7, ordered=rng.random() < 0.5)
    async def keyed(x):
        await trio.sleep(rng.random() * 0.1)
        return x

    @stage(workers=2)
    async def after(x):
        await trio.sleep(rng.random() * 0.05)
        return x

    outputs = None
    with trio.move_on_after(rng.random() * 2):
        async with Pipeline(keyed | after).stream(range(200)) as outputs:
            async for _ in outputs:
                pass
    if outputs is not None and outputs.result is not None:
        assert_conserved(outputs.result)
    assert_nothing_left_running()


@pytest.mark.parametrize("seed", range(40))
async def test_cancelling_open_while_feeding_is_a_clean_cancellation(seed, autojump_clock):
    """open() cancelled from outside while the body feeds it with send and offer: the
    cancellation is all that comes out (no BrokenResourceError from offer)."""
    rng = random.Random(seed)

    @stage(workers=2, buffer=2)
    async def work(x):
        await trio.sleep(rng.random() * 0.2)
        return x

    flow = None
    with trio.move_on_after(rng.random()):
        async with Pipeline(work).open() as flow:
            i = 0
            while True:
                if i % 3:
                    flow.offer(i)
                    await trio.sleep(0.01)
                else:
                    await flow.send(i)
                i += 1
    assert flow is not None
    assert flow.result is not None
    assert_conserved(flow.result)
    assert_nothing_left_running()


def random_pipeline(rng):
    """A pipeline of 2-4 stages drawn from every kind and shaper pipeflow has."""

    async def pause():
        await trio.sleep(rng.random() * 0.05)

    def make(i):
        kind = rng.choice(["async", "thread", "agen", "keyed", "batched", "ordered"])
        name = f"s{i}_{kind}"
        if kind == "thread":

            @stage(workers=rng.randint(1, 4), name=name)
            def plain(x):
                return x

            return plain
        if kind == "agen":

            @stage(workers=rng.randint(1, 4), name=name, ordered=rng.random() < 0.3)
            async def spread(x):
                await pause()
                for _ in range(x % 3):
                    yield x

            return spread
        if kind == "batched":

            @stage(
                workers=rng.randint(1, 3), name=name, batch=rng.randint(2, 6), batch_timeout=0.05
            )
            async def batch(xs):
                await pause()
                return len(xs)

            return batch
        options = {"workers": rng.randint(1, 5), "name": name}
        if kind == "keyed":
            options["key"] = lambda x: hash(x) % 5
        if kind == "ordered":
            options["ordered"] = True

        @stage(**options)
        async def work(x):
            await pause()
            return x

        return work

    chain = make(0)
    for i in range(1, rng.randint(2, 4)):
        chain = chain | make(i)
    return Pipeline(chain)


@pytest.mark.parametrize("seed", range(60))
async def test_random_cancellation_of_mixed_pipelines(seed, autojump_clock):
    """Mixed pipelines (async, thread, generator, keyed, batched, ordered) stopped at a
    random time, from outside or by leaving stream() early: nothing is raised but the
    cancellation, the stages balance, nothing is left running."""
    rng = random.Random(seed)
    pipeline = random_pipeline(rng)
    stop_after = rng.randint(0, 40)
    outputs = None
    with trio.move_on_after(rng.random() * 3):
        async with pipeline.stream(range(300)) as outputs:
            seen = 0
            async for _ in outputs:
                seen += 1
                if seen >= stop_after and rng.random() < 0.5:
                    break
    if outputs is not None and outputs.result is not None:
        assert_conserved(outputs.result)
    assert_nothing_left_running()


@pytest.mark.parametrize("ordered", [False, True])
async def test_outputs_a_stop_left_unread_are_in_the_result(ordered, autojump_clock):
    """A reader slower than the pipeline, cancelled from outside: the outputs made but
    not read (those in the outlet, those the reader had taken but not returned) are in
    ``result.unread``, in order for an ordered stage; every item the stage took is read,
    unread or unfinished, once (before, the unread ones were counted ok and were
    nowhere: 58 of 66 in a hostile user's test)."""

    @stage(workers=4, ordered=ordered)
    async def work(x):
        return x

    read = []
    with trio.move_on_after(0.05):
        async with Pipeline(work).stream(range(100)) as outputs:
            async for x in outputs:
                read.append(x)
                await trio.sleep(0.02)
    result = outputs.result
    taken = result.stats["work"].items_in
    unfinished = [x for _, x in result.unfinished]
    assert len(result.unread) > 10
    everything = read + result.unread + unfinished
    assert sorted(everything) == list(range(taken))
    if ordered:
        assert read + result.unread == list(range(len(read) + len(result.unread)))
    assert_conserved(result)
    assert_nothing_left_running()


async def test_outputs_of_a_thread_stage_that_finish_after_a_stop_are_unread(autojump_clock):
    """A plain-function last stage cannot be cut in the middle of a call: the items its
    threads finish after an outer cancellation are counted ok and their outputs are in
    ``result.unread`` (before, they were dropped)."""
    import time

    @stage(workers=2)
    def slow(x):
        time.sleep(0.2)
        return x * 10

    with trio.move_on_after(0.1):
        async with Pipeline(slow).stream(range(10)) as outputs:
            async for _ in outputs:
                raise AssertionError("nothing is read before the stop")
    result = outputs.result
    assert sorted(result.unread) == [0, 10]
    assert result.stats["slow"].ok == 2
    assert_conserved(result)
    assert_nothing_left_running()


async def test_run_and_a_normal_end_leave_nothing_unread(autojump_clock):
    """``run()``/``arun()`` keep every output; a stream read to its end leaves none."""

    @stage(workers=2)
    async def work(x):
        return x

    assert (await Pipeline(work).arun(range(10))).unread == []
    async with Pipeline(work).stream(range(10)) as outputs:
        assert sorted([x async for x in outputs]) == list(range(10))
    assert outputs.result.unread == []


async def test_the_report_of_a_stopped_run_says_what_to_run_again(autojump_clock):
    """RunResult.to_dict() (the report of `pipeflow run --report`) lists the unfinished
    items and the unread outputs: as they are when JSON can hold them, else as their
    repr; the whole report is JSON."""
    import json

    class Opaque:
        def __repr__(self):
            return "Opaque()"

    @stage(workers=1)
    async def slow(x):
        await trio.sleep(1)
        return x

    with trio.move_on_after(0.5):
        async with Pipeline(slow).stream([{"url": "a"}, Opaque(), "c"]) as outputs:
            async for _ in outputs:
                pass
    report = outputs.result.to_dict()
    assert report["unfinished"] == [
        {"stage": "slow", "item": {"url": "a"}},
        {"stage": "slow", "item": "Opaque()"},
        {"stage": "slow", "item": "c"},
    ]
    assert report["unread"] == []
    assert json.loads(json.dumps(report, allow_nan=False))["unfinished"] == report["unfinished"]


@pytest.mark.parametrize("output_buffer", [0, 32])
async def test_open_lists_the_outputs_a_stop_kept_from_its_reader(output_buffer, autojump_clock):
    """open(outputs=True) cancelled from outside while a plain-function last stage is in
    its calls, nobody reading: the outputs its threads make after the stop either wait
    in flow.outputs, readable after the block (room for them), or, with no room, are in
    ``result.unread`` (before, dropped)."""
    import time

    @stage(workers=2)
    def slow(x):
        time.sleep(0.2)
        return x * 10

    with trio.move_on_after(0.1):
        async with Pipeline(slow).open(outputs=True, output_buffer=output_buffer) as flow:
            await flow.send(1)
            await flow.send(2)
            await trio.sleep(1)
    result = flow.result
    readable = [x async for x in flow.outputs]
    assert sorted(readable + result.unread) == [10, 20]
    assert (readable == []) == (output_buffer == 0)
    assert result.stats["slow"].ok == 2
    assert_conserved(result)
    assert_nothing_left_running()


async def test_a_stop_at_a_busy_workers_periodic_checkpoint_lists_the_item_it_took(
    autojump_clock,
):
    """A worker whose items never wait (here a millisecond of work each, none awaiting)
    takes them one at a time and lets the others run every 32 items: a stop that comes
    meanwhile lands there, and takes the item the worker had just taken, which is
    cancelled and listed, not lost."""
    scope = trio.CancelScope()

    @stage(workers=1, buffer=1000)
    async def busy(x):
        autojump_clock.jump(0.001)  # work that does not await
        if x == 40:
            scope.cancel()  # lands at the worker's next checkpoint
        return x

    @stage(workers=1, buffer=1000)
    async def after(x):
        return x

    flow = None
    with scope:
        async with Pipeline(busy | after).open() as flow:
            for i in range(400):  # all queued before the worker starts
                flow.send_nowait(i)
            await trio.sleep_forever()
    assert flow is not None
    assert flow.result is not None
    result = flow.result
    assert_conserved(result)
    s = result.stats["busy"]
    assert (400, 400) == (s.items_in, s.ok + s.cancelled), s
    assert 40 < s.ok < 400, s
    # The item the worker had taken when the stop came, then the ones still queued.
    assert list(range(s.ok, 400)) == [x for name, x in result.unfinished if name == "busy"]


@pytest.mark.parametrize("acking", [False, True])
async def test_fail_fast_keeps_the_outputs_the_last_stage_made_before_the_failure(
    acking, autojump_clock
):
    """A chunk of quick items in the last stage of run(): the items before the one that
    fails have their outputs made and counted ok when the stop comes. They are in the
    failure's result.outputs (run() keeps every output), and acked."""
    source = ListSource(range(70))
    acked = source.acked

    @stage(workers=4)
    async def check(x):
        if x == 44:
            raise ValueError(x)
        return x

    with pytest.raises(StageError) as info:
        await Pipeline(check).arun(source if acking else range(70))
    result = info.value.result
    assert_conserved(result)
    s = result.stats["check"]
    assert (1, len(result.outputs)) == (s.failed, s.ok), s
    unfinished = {item for _, item in result.unfinished}
    assert set(range(s.items_in)) == {*result.outputs, *unfinished, 44}
    if acking:
        assert sorted(acked) == sorted(result.outputs)


@pytest.mark.parametrize("collect", [True, False])
async def test_fail_fast_keeps_the_outputs_an_ordered_last_stage_held_back(collect, autojump_clock):
    """An ordered last stage holds finished outputs behind a slow first item; a fail-fast
    stop takes that item. The outputs it held were counted ok: they are run()'s outputs,
    in order (before, they were dropped, in neither the outputs nor the unfinished)."""

    @stage(workers=3, ordered=True)
    async def work(x):
        if x == 0:
            await trio.sleep(1)  # the head of the line is slow
        if x == 4:
            await trio.sleep(0.1)
            raise ValueError(x)  # fail-fast while 1, 2, 3 and 5 wait in the window
        return x

    with pytest.raises(StageError) as info:
        await Pipeline(work).arun(range(6), collect=collect)
    result = info.value.result
    assert_conserved(result)
    s = result.stats["work"]
    assert (6, 4, 1, 1) == (s.items_in, s.ok, s.failed, s.cancelled)
    assert [("work", 0)] == result.unfinished
    assert ([1, 2, 3, 5] if collect else []) == result.outputs


async def test_the_outputs_an_ordered_stage_made_before_a_stop_stay_in_order(autojump_clock):
    """After a fail-fast stop, the outputs an ordered stage had made are left in input
    order: those waiting for an earlier item the stop took, and those of a worker the
    stop cut in the middle of a chunk. (Before, the cut worker's came first: stream()'s
    unread outputs read [9, 10, 11, 1, 2, ...].)"""

    @stage(workers=3, ordered=True, name="work")
    async def work(x):
        if x == 0:
            await trio.sleep(10)  # the head of the line
        elif x == 12:
            await trio.sleep(1)  # in a chunk: the outputs made before it wait with it
        elif x == 15:
            await trio.sleep(0.5)
            raise ValueError(x)
        return x

    async def read_all():
        async with Pipeline(work).stream(range(20), buffer=32) as outputs:
            async for _ in outputs:
                pass

    with pytest.raises(StageError) as info:
        await read_all()
    result = info.value.result
    assert_conserved(result)
    s = result.stats["work"]
    assert s.ok == len(result.unread)
    assert sorted(result.unread) == result.unread
    assert {0, 12} <= {item for _, item in result.unfinished}


async def test_a_stop_cutting_an_embedded_failure_on_its_way_to_a_dead_letter_stage(
    autojump_clock,
):
    """errors="embed" with a dead-letter stage: a failed item goes on as a Failed value
    and its copy to the dead-letter stage. A stop (the reader leaves) while that copy
    waits for room keeps both: the copy is unfinished at the dead-letter stage, the value
    that goes on is an unread output (before, it was in neither)."""

    @stage(workers=1, buffer=0, name="dls")
    async def dls(failed):
        await trio.sleep(100)  # a slow dead-letter sink: its queue stays full

    @stage(workers=1, errors="embed", name="work")
    async def work(x):
        if x >= 1:
            raise ValueError(x)
        return x

    pipeline = Pipeline(work, dead_letter=dls)
    read = []
    async with pipeline.stream(range(3), buffer=0) as outputs:
        async for out in outputs:
            read.append(out)
            if len(read) == 2:
                break  # item 2's copy is still waiting for the dead-letter stage
    result = outputs.result
    assert_conserved(result)
    assert 0 == read[0]
    assert [1, 2] == [read[1].item, *(f.item for f in result.unread)]
    assert [("dls", 1), ("dls", 2)] == [(name, f.item) for name, f in result.unfinished]
    s = result.stats["work"]
    assert (3, 1, 2) == (s.items_in, s.ok, s.failed)


@pytest.mark.parametrize("ordered", [False, True])
async def test_stream_over_an_acking_source_raises_a_fail_fast_failure(ordered, autojump_clock):
    """stream() over an acking source (Redis is one), with a dead-letter stage: a fail-fast
    failure is raised at once, the items read are acked and the others are not. (Before,
    the source's task waited for ever for the reader to drain the outputs, after the
    reader's block had been ended by the failure: the run never returned.)"""
    source = ListSource(range(80))
    acked = source.acked

    @stage(workers=4, ordered=ordered, name="work")
    async def work(x):
        if x % 2:
            await trio.sleep(0.01)
        if x == 7:
            raise ValueError(x)
        return x

    dead = []

    @stage(workers=1, name="dls")
    async def dls(failed):
        await trio.sleep(0.005)
        dead.append(failed.item)

    read = []

    async def read_all():
        async with Pipeline(work, dead_letter=dls).stream(source) as outputs:
            async for out in outputs:
                read.append(out)

    start = trio.current_time()
    with trio.move_on_after(600):  # the hang ended only when something cancelled it
        with pytest.raises(StageError) as info:
            await read_all()
    assert trio.current_time() - start < 1  # raised at once (the failure comes at 0.01 s)
    assert 7 == info.value.item
    result = info.value.result
    assert_conserved(result)
    assert sorted(acked) == sorted(read)
    assert 7 not in acked


@pytest.mark.parametrize("steps", range(6))
async def test_a_fail_fast_failure_is_raised_when_the_caller_cancels_just_after_it(
    steps, autojump_clock
):
    """An item fails (fail-fast) in stream() from an acking source, and the caller's
    cancel comes a few scheduler steps later, while the run winds down: the StageError
    is raised all the same (the caller's scope takes its cancellation), not swallowed."""
    failing = trio.Event()

    class Acking:
        @contextlib.asynccontextmanager
        async def __pipeflow_open__(self, *, capacity):
            async def pairs():
                for i in range(10):
                    await trio.sleep(0.1)
                    yield i, None

            yield pairs()

    @stage(workers=(1, 6))
    async def check(x):
        if x == 3:
            await failing.wait()
            raise ValueError(f"boom {x}")
        return x

    @stage(workers=(1, 6))
    async def after(x):
        await trio.sleep(0.05)
        yield x

    raised = []
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:  # the test's: its errors come grouped

                async def fail_then_cancel():
                    await trio.sleep(1)
                    failing.set()
                    for _ in range(steps):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()

                nursery.start_soon(fail_then_cancel)
                async with Pipeline(check | after).stream(Acking()) as outputs:
                    async for _ in outputs:
                        pass
    except* StageError as group:
        raised.extend(group.exceptions)
    assert ["stage 'check' failed on item 3: ValueError: boom 3"] == [str(e) for e in raised]
    assert 1 == raised[0].result.stats["check"].failed
