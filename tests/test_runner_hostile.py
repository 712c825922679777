"""Runner v2 as a hostile user drives it: stops at random moments over mixed pipelines,
items that are fast and then suddenly slow, acking sources, order with failures and
flat-maps. The xfail tests are bugs found this way (strict: they must still fail); the
others guard the combinations that hold."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading

import pytest
import trio

from pipeflow import Failed, Pipeline, PipelineClosed, PipelineFull, StageError, stage
from pipeflow.testing import assert_nothing_left_running

# -- helpers -------------------------------------------------------------------------------


def assert_balanced(result, pipeline=None):
    """Conservation in every stage, nothing in flight, ``unfinished`` matching the
    ``cancelled`` counts; with ``pipeline``, also that what each stage handed on is what
    the next one counted in (nothing vanishes on the edge between two stages)."""
    for s in result.stats.values():
        assert s.items_in == s.ok + s.filtered + s.failed + s.dropped + s.cancelled, s
        assert 0 == s.inflight, s
    cancelled = {name: s.cancelled for name, s in result.stats.items()}
    listed = dict.fromkeys(result.stats, 0)
    for name, _ in result.unfinished:
        listed[name] += 1
    assert cancelled == listed
    if pipeline is None:
        return
    stages = pipeline.stages
    for a, b in itertools.pairwise(stages):
        if a.options.batch is not None or b.options.batch is not None:
            continue  # a batch is one item on the edge and several in the counts
        sa, sb = result.stats[a.name], result.stats[b.name]
        embedded = sa.failed if a.options.errors == "embed" else 0
        assert sa.items_out + sa.passed + embedded == sb.items_in + sb.passed, (sa, sb)


class Ledger:
    """A fake acking source's record: which items were acked, how often."""

    def __init__(self, n):
        self.n = n
        self.pulled = []
        self.acked = []
        self.errors = []


class FakeAck:
    def __init__(self, ledger, item):
        self.ledger = ledger
        self.item = item
        self.pending = 1

    def add(self, n):
        self.pending += n

    def done(self):
        self.pending -= 1
        if self.pending == 0:
            self.ledger.acked.append(self.item)
        elif self.pending < 0:
            self.ledger.errors.append(self.item)


class AckingSource:
    """The smallest acking source: ``__pipeflow_open__(capacity=...)`` yielding
    ``(item, ack)`` pairs (the runner's backpressure bounds what it holds)."""

    ack = None  # the Ack class; FakeAck unless a subclass says otherwise

    def __init__(self, n):
        self.ledger = Ledger(n)

    @contextlib.asynccontextmanager
    async def __pipeflow_open__(self, *, capacity):
        ledger = self.ledger

        async def entries():
            for i in range(ledger.n):
                await trio.lowlevel.checkpoint()
                ledger.pulled.append(i)
                yield i, (self.ack or FakeAck)(ledger, i)

        yield entries()


def fails(salt, x, rate):
    """Whether item ``x`` fails in the stage ``salt``: fixed per (stage, item)."""
    return isinstance(x, int) and random.Random(f"{salt}:{x}").random() < rate


def mixed_stage(rng, i, fail_rate, errors, dead_letter):
    """One stage of a random kind that keeps item identity (maps and filters), with
    quick items and every 40th item slow."""
    kind = rng.choice(
        ["async", "filter", "thread", "syncfilter", "inline", "ordered", "auto", "resource"]
    )
    options = {"name": f"s{i}_{kind}", "workers": rng.randint(1, 4), "errors": errors}
    if rng.random() < 0.3:
        options["buffer"] = rng.randint(0, 6)
    if dead_letter is not None:
        options["dead_letter"] = dead_letter
    name = options["name"]

    async def pause(x):
        if isinstance(x, int) and x % 40 == 39:
            await trio.sleep(0.3)

    def check(x):
        if fails(name, x, fail_rate):
            raise ValueError(f"{name} fails on {x}")

    if kind == "filter":

        @stage(**options, ordered=rng.random() < 0.4)
        async def keep_some(x):
            await pause(x)
            check(x)
            if x % 5:
                yield x

        return keep_some
    if kind == "thread":

        @stage(**options)
        def plain(x):
            check(x)
            return x

        return plain
    if kind == "syncfilter":

        @stage(**options)
        def keep_odd(x):
            check(x)
            if x % 2:
                yield x

        return keep_odd
    if kind == "inline":

        @stage(**options, run_in="task")
        def inline(x):
            check(x)
            return x

        return inline
    if kind == "resource":
        opened = []

        @contextlib.asynccontextmanager
        async def connection():
            opened.append(1)
            try:
                yield "conn"
            finally:
                await trio.sleep(0.001)
                opened.pop()

        @stage(**options, resource=connection)
        async def with_conn(x, conn):
            await pause(x)
            check(x)
            return x

        with_conn.opened = opened
        return with_conn
    if kind == "ordered":
        options["ordered"] = True
    if kind == "auto":
        options["workers"] = (1, 6)

    @stage(**options)
    async def work(x):
        await pause(x)
        check(x)
        return x

    return work


def mixed_pipeline(rng, errors, dead_letter=None):
    fail_rate = rng.choice([0.0, 0.05, 0.2])
    chain = mixed_stage(rng, 0, fail_rate, errors, dead_letter)
    for i in range(1, rng.randint(2, 4)):
        chain = chain | mixed_stage(rng, i, fail_rate, errors, dead_letter)
    return Pipeline(chain)


def assert_resources_closed(pipeline):
    for st in pipeline.stages:
        assert getattr(st, "opened", []) == [], st.name


# -- what holds ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
async def test_random_stops_of_mixed_pipelines_lose_nothing_between_stages(seed, autojump_clock):
    """Maps and filters of every kind (async, generators, threads, inline, ordered,
    autoscaled, with resources) under collect/skip/embed, stopped from outside or by
    leaving stream() at a random moment: every stage balances, every item a stage handed
    on is counted by the next, resources are closed, nothing is left running."""
    rng = random.Random(seed)
    letters = []
    errors = rng.choice(["collect", "skip", "embed"])
    pipeline = mixed_pipeline(rng, errors, dead_letter=letters.append)
    pulled = []

    def source():
        for i in range(200):
            pulled.append(i)
            yield i

    leave_after = rng.choice([None, rng.randint(0, 60)])
    outputs = None
    with trio.move_on_after(rng.random() * 2):
        async with pipeline.stream(source(), buffer=rng.choice([0, 1, 32])) as outputs:
            seen = 0
            async for _ in outputs:
                seen += 1
                if leave_after is not None and seen >= leave_after:
                    break
    assert outputs is not None
    assert outputs.result is not None
    result = outputs.result
    assert_balanced(result, pipeline)
    first = result.stats[pipeline.stages[0].name]
    assert first.items_in + first.passed == len(pulled)
    assert_resources_closed(pipeline)
    assert_nothing_left_running()


@pytest.mark.parametrize("seed", range(10))
async def test_full_runs_of_mixed_pipelines_account_for_every_item(seed, autojump_clock):
    """Without a stop, each input is an output (or its Failed value), a collected error,
    a dead letter or a filtered item, exactly once."""
    rng = random.Random(seed)
    letters = []
    errors = rng.choice(["collect", "skip", "embed"])
    pipeline = mixed_pipeline(rng, errors, dead_letter=letters.append)
    result = await pipeline.arun(range(150))
    assert_balanced(result, pipeline)
    assert result.unfinished == []
    outs = [o.item if isinstance(o, Failed) else o for o in result.outputs]
    assert len(outs) == len(set(outs))
    dead = [f.item for f in letters]
    assert len(dead) == sum(s.failed for s in result.stats.values())
    if errors == "collect":
        assert sorted(e.item for e in result.errors) == sorted(dead)
    filtered = sum(s.filtered for s in result.stats.values())
    kept = len(outs) + (0 if errors == "embed" else len(dead))
    assert kept + filtered == 150
    assert set(outs) | set(dead) <= set(range(150))
    assert_resources_closed(pipeline)


async def test_ordered_outputs_keep_input_order_with_failures_filters_and_flat_maps(
    autojump_clock,
):
    """Three ordered stages (embed failures, a flat-map that also filters, a plain
    function in threads) with random delays: outputs come out in input order."""
    rng = random.Random(7)
    delays = {i: rng.random() * 0.01 for i in range(300)}

    @stage(workers=5, ordered=True, errors="embed")
    async def check(x):
        await trio.sleep(delays[x])
        if x % 11 == 0:
            raise ValueError(x)
        return x

    @stage(workers=4, ordered=True)
    async def spread(x):
        await trio.sleep(delays[x.item if isinstance(x, Failed) else x])
        for k in range(x % 3):
            yield (x, k)

    @stage(workers=3, ordered=True)
    def plain(pair):
        return pair

    result = await Pipeline(check | spread | plain).arun(range(300))
    expected = []
    for x in range(300):
        if x % 11 == 0:
            expected.append(("failed", x))
        else:
            expected += [(x, k) for k in range(x % 3)]
    got = [("failed", o.item) if isinstance(o, Failed) else o for o in result.outputs]
    assert got == expected


@pytest.mark.parametrize("ordered", [False, True])
async def test_async_stage_fast_then_slow_spreads_the_slow_items(ordered, autojump_clock):
    """After 200 instant items (the stage takes chunks), 8 items of 1 s each arriving at
    once run on all 4 workers: 2 s, not 8."""

    @stage(workers=4, ordered=ordered)
    async def work(x):
        if x >= 200:
            await trio.sleep(1)
        return x

    async with Pipeline(work).open() as flow:
        for i in range(200):
            await flow.send(i)
        await trio.sleep(0.1)
        start = trio.current_time()
        for i in range(200, 208):
            flow.send_nowait(i)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert_balanced(flow.result)


async def test_acking_source_acks_every_finished_item_exactly_once(autojump_clock):
    """Through a flat-map, a batch stage and embedded failures with a dead-letter stage,
    each source item is acked exactly once, after the whole run."""
    source = AckingSource(120)
    letters = []

    @stage(name="letters", workers=2)
    async def keep_letter(failed):
        await trio.sleep(0.01)
        letters.append(failed)

    @stage(workers=3, errors="collect", dead_letter=keep_letter)
    async def spread(x):
        await trio.sleep(0.001 * (x % 4))
        if x % 13 == 5:
            raise ValueError(x)
        for _ in range(x % 3):
            yield x

    @stage(workers=2, batch=5, batch_timeout=0.05)
    async def batched(xs):
        await trio.sleep(0.01)
        return len(xs)

    result = await Pipeline(spread | batched).arun(source)
    ledger = source.ledger
    assert ledger.errors == []
    assert sorted(ledger.acked) == list(range(120))
    assert len(letters) == len(result.errors) == result.stats["spread"].failed
    assert_balanced(result)


@pytest.mark.parametrize("seed", range(10))
async def test_acking_source_never_acks_what_a_stop_left_unfinished(seed, autojump_clock):
    """A fail-fast stop at a random item: no unfinished item is acked, no item is acked
    twice, and every acked item really left the pipeline."""
    rng = random.Random(seed)
    source = AckingSource(200)
    bad = rng.randint(20, 150)

    @stage(workers=rng.randint(1, 4))
    async def first(x):
        await trio.sleep(rng.random() * 0.01)
        return x

    @stage(workers=rng.randint(1, 4), ordered=rng.random() < 0.5)
    async def second(x):
        await trio.sleep(rng.random() * 0.02)
        if x == bad:
            raise ValueError(x)
        if x % 3:
            yield x

    with pytest.raises(StageError) as info:
        await Pipeline(first | second).arun(source)
    result = info.value.result
    ledger = source.ledger
    assert ledger.errors == []
    assert len(ledger.acked) == len(set(ledger.acked))
    unfinished = {x for _, x in result.unfinished}
    assert not unfinished & set(ledger.acked)
    assert bad not in ledger.acked
    assert set(result.outputs) <= set(ledger.acked)
    assert_balanced(result)


async def test_flow_with_a_slow_reader_gets_every_output(autojump_clock):
    """open(outputs=True) read one output per second from another task: the reader
    gets every output, in 9 s, and nothing is unfinished."""
    read = []

    @stage(workers=2)
    async def work(x):
        return x

    start = trio.current_time()
    async with trio.open_nursery() as nursery, Pipeline(work).open(outputs=True) as flow:

        async def reader():
            async for out in flow.outputs:
                read.append((trio.current_time() - start, out))
                await trio.sleep(1)

        nursery.start_soon(reader)
        for i in range(10):
            await flow.send(i)
    assert sorted(out for _, out in read) == list(range(10))
    assert read[-1][0] == pytest.approx(9.0)
    assert flow.result.unfinished == []
    assert_balanced(flow.result)


async def test_batch_timeout_flushes_a_partial_batch_on_time(autojump_clock):
    """batch=10, batch_timeout=0.5: three items at t=0 reach the function at t=0.5."""
    calls = []

    @stage(batch=10, batch_timeout=0.5)
    async def batched(xs):
        calls.append((trio.current_time(), list(xs)))
        return xs

    async def source():
        for i in range(3):
            yield i
        await trio.sleep(5)

    start = trio.current_time()
    await Pipeline(batched).arun(source())
    assert [(t - start, xs) for t, xs in calls] == [(0.5, [0, 1, 2])]


@pytest.mark.parametrize("seed", range(20))
async def test_feeding_open_from_three_tasks_then_cancelling_counts_every_accepted_item(
    seed, autojump_clock
):
    """Three tasks feed open() with send, send_nowait and offer until an outer
    cancellation: only the cancellation comes out, the stages balance, and the first
    stage counts every accepted and every dropped item (a send cut by the stop may count
    or not)."""
    rng = random.Random(seed)
    options = {"workers": rng.randint(1, 4), "buffer": rng.randint(0, 5)}
    if rng.random() < 0.3:
        options["ordered"] = True

    @stage(**options)
    async def first(x):
        await trio.sleep(rng.random() * 0.05)
        return x

    @stage(workers=2)
    def second(x):
        return x

    accepted, cut = set(), set()
    dropped = 0
    flow = None

    async def feeder(k):
        nonlocal dropped
        for i in itertools.count(k * 1_000_000):
            choice = rng.random()
            if choice < 0.4:
                try:
                    await flow.send(i)
                except trio.Cancelled:
                    cut.add(i)
                    raise
                accepted.add(i)
            elif choice < 0.7:
                try:
                    flow.send_nowait(i)
                    accepted.add(i)
                except PipelineFull:
                    await trio.sleep(0.001)
            else:
                if flow.offer(i):
                    accepted.add(i)
                else:
                    dropped += 1
                await trio.sleep(0.0005)

    with trio.move_on_after(rng.random()):
        async with Pipeline(first | second).open() as flow, trio.open_nursery() as nursery:
            for k in range(3):
                nursery.start_soon(feeder, k)
    result = flow.result
    assert_balanced(result, Pipeline(first | second))
    counted = result.stats["first"].items_in - dropped
    assert len(accepted) <= counted <= len(accepted) + len(cut)
    assert_nothing_left_running()


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_source_that_raises_midway_stops_the_run_with_its_error(
    asynchronous, autojump_clock
):
    """A source (generator or async generator) that raises after 50 items: the run
    raises that error itself, and nothing is left running."""

    def source():
        yield from range(50)
        raise OSError("disk gone")

    async def asource():
        for i in range(50):
            yield i
            await trio.sleep(0.01)
        raise OSError("disk gone")

    @stage(workers=3)
    async def work(x):
        await trio.sleep(0.1)
        return x

    @stage(workers=2)
    def plain(x):
        return x

    with pytest.raises(OSError, match="disk gone"):
        await Pipeline(work | plain).arun(asource() if asynchronous else source())
    assert_nothing_left_running()


# -- found by trying to break the runner, fixed ----------------------------------------------------------------------------------


async def failing_stream_cut_at_1s(errors, dead_letter):
    """A stage ``bad`` whose every item fails after 0.1 s (under ``errors``, with
    ``dead_letter``), read through stream() over range(5) and cancelled at 1 s: its
    result."""

    @stage(workers=1, errors=errors, dead_letter=dead_letter)
    async def bad(x):
        await trio.sleep(0.1)
        raise ValueError(x)

    outputs = None
    with trio.move_on_after(1):
        async with Pipeline(bad).stream(range(5)) as outputs:
            async for _ in outputs:
                pass
    return outputs.result


@pytest.mark.parametrize("errors", ["collect", "embed", "skip"])
async def test_a_stop_during_a_dead_letter_hand_over_leaves_nothing_in_flight(
    errors, autojump_clock
):
    """An outer cancellation while a failed item waits for a busy dead-letter stage:
    afterwards no stage shows an item in flight, each failure counted under collect
    is in result.errors, and no failed item is lost: the one whose hand-over the stop
    cut is listed in result.unfinished under the dead-letter stage, as the items the
    stop took from the stage's queue are under the stage."""
    letters = []

    @stage(name="letters", workers=1, buffer=0)
    async def keep_letter(failed):
        letters.append(failed.item)
        await trio.sleep(10)

    result = await failing_stream_cut_at_1s(errors, keep_letter)
    assert_balanced(result)
    if errors == "collect":
        assert len(result.errors) == result.stats["bad"].failed
    # 0 is with the letters' worker, 1 on its way there, 2 and 3 queued (the source is
    # pulled only as far as the stage has room: 4 was never taken).
    assert letters == [0]
    assert sorted((s, x.item if s == "letters" else x) for s, x in result.unfinished) == [
        ("bad", 2),
        ("bad", 3),
        ("letters", 0),
        ("letters", 1),
    ]
    assert (result.stats["bad"].failed, result.stats["bad"].cancelled) == (2, 2)
    assert_nothing_left_running()


async def test_cancelling_a_keyed_stage_loses_no_accepted_item(autojump_clock):
    """Every item open() accepted before an outer cancellation is either done or in
    result.unfinished (here: all five, the stage's items take 10 s)."""

    # Keys 0 and 4 go to different workers of two (stable_hash).
    @stage(workers=2, key=lambda x: 4 * (x % 2), buffer=2)
    async def keyed(x):
        await trio.sleep(10)
        return x

    flow = None
    with trio.move_on_after(5):
        async with Pipeline(keyed).open() as flow:
            for i in (0, 1, 2):
                await flow.send(i)
                await trio.sleep(0.1)
            # Taken by the router together: 4 waits for worker 0's full edge, 3 is next.
            flow.send_nowait(4)
            flow.send_nowait(3)
            await trio.sleep(10)
    result = flow.result
    assert sorted(x for _, x in result.unfinished) == [0, 1, 2, 3, 4]
    assert_balanced(result)


async def test_cancelling_a_batched_stage_loses_no_accepted_item(autojump_clock):
    """Every item open() accepted before an outer cancellation is either done or in
    result.unfinished (here: all nine, the batches take 10 s)."""

    @stage(workers=1, batch=2, buffer=8)
    async def batched(xs):
        await trio.sleep(10)
        return xs

    flow = None
    with trio.move_on_after(5):
        async with Pipeline(batched).open() as flow:
            flow.send_nowait(0)
            flow.send_nowait(1)
            await trio.sleep(0.1)
            # Taken by the batcher in one chunk: [2, 3] waits for the busy worker.
            for i in range(2, 9):
                flow.send_nowait(i)
            await trio.sleep(10)
    result = flow.result
    assert sorted(x for _, x in result.unfinished) == list(range(9))
    assert_balanced(result)


async def test_async_generator_stage_fast_then_slow_spreads_the_slow_items(autojump_clock):
    """An async generator stage after 200 instant items: 8 items of 1 s each arriving at
    once run on all 4 workers, 2 s and not 8."""

    @stage(workers=4)
    async def work(x):
        if x >= 200:
            await trio.sleep(1)
        yield x

    async with Pipeline(work).open() as flow:
        for i in range(200):
            await flow.send(i)
        await trio.sleep(0.1)
        start = trio.current_time()
        for i in range(200, 208):
            flow.send_nowait(i)
    assert trio.current_time() - start == pytest.approx(2.0)


def test_thread_stage_fast_then_blocking_items_run_on_idle_workers():
    """A plain-function stage with 4 workers, after hundreds of instant items: 4 items
    that each wait for the others (a barrier) arriving at once run at the same time
    (in every one of six rounds). They arrive together, so one worker takes them in one
    thread call: the first blocks there, and the stage's watcher hands the others back
    to the idle workers while it does (calls.watch_claims)."""
    barrier = threading.Barrier(4, timeout=0.3)

    @stage(workers=4, errors="collect")
    def work(x):
        if x < 0:
            barrier.wait()
        return x

    async def main():
        async with Pipeline(work).open() as flow:
            for r in range(1, 7):
                for i in range(300):
                    await flow.send(i)
                await trio.sleep(0.05)
                for i in range(-4, 0):
                    flow.send_nowait(i)
                for _ in range(300):  # until the round is done
                    s = flow.stats()["work"]
                    if s.items_out + s.failed >= 304 * r:
                        break
                    await trio.sleep(0.01)
                if s.failed:
                    break
        return flow.result

    result = trio.run(main)
    assert 0 == result.stats["work"].failed


async def test_an_exception_group_from_the_callers_code_in_stream_comes_out_whole(
    autojump_clock,
):
    """An ExceptionGroup raised by the caller's own nursery inside the stream() block
    comes out with all its errors, so ``except*`` sees both the ValueError and the
    KeyError."""

    @stage(workers=2)
    async def work(x):
        await trio.sleep(0.1)
        return x

    async def boom(error):
        raise error

    seen = []
    try:
        async with Pipeline(work).stream(range(100)), trio.open_nursery() as nursery:
            nursery.start_soon(boom, ValueError("a"))
            nursery.start_soon(boom, KeyError("b"))
    except* KeyError as group:
        seen.extend(group.exceptions)
    except* ValueError as group:
        seen.extend(group.exceptions)
    assert sorted(type(e).__name__ for e in seen) == ["KeyError", "ValueError"]


async def test_stream_from_an_acking_source_acks_every_output_before_closing_it(
    autojump_clock,
):
    """stream() over an acking source (default outlet buffer) with a reader taking 1 s
    per output: the source stays open until its last item is acked (an ack after the
    close is lost)."""
    late = []

    class Source(AckingSource):
        closed = False

        @contextlib.asynccontextmanager
        async def __pipeflow_open__(self, *, capacity):
            async with super().__pipeflow_open__(capacity=capacity) as entries:
                yield entries
            self.closed = True

    source = Source(20)

    class Ack(FakeAck):
        def done(self):
            if source.closed:
                late.append(self.item)
            super().done()

    source.ack = Ack

    @stage(workers=2)
    async def work(x):
        return x

    async with Pipeline(work).stream(source) as outputs:
        async for _ in outputs:
            await trio.sleep(1)
    assert sorted(source.ledger.acked) == list(range(20))
    assert late == []


@pytest.mark.parametrize("cancel_at", [None, 0.5])
async def test_a_quick_chunk_with_failures_passing_values_and_an_item_that_waits(
    cancel_at, autojump_clock
):
    """A chunk of a quick async stage holding a failure, a Failed value from upstream,
    and an item that waits 1 s: the outputs before the waiting item leave at once, the
    items after it run on the other workers at once, the failure reaches the dead-letter
    sink, and the counts balance. Cancelled while the item waits, nothing is lost: the
    waiting item is listed as unfinished."""
    dead = []

    @stage(workers=1, buffer=16, errors="embed")
    async def pre(x):
        if x == "embed":
            raise ValueError("upstream")
        return x

    @stage(workers=4, buffer=16, errors="skip", dead_letter=dead.append)
    async def work(x):
        if x == "bad":
            raise KeyError(x)
        if x == "slow":
            await trio.sleep(1)
        return x

    pipeline = Pipeline(pre | work)
    arrived = {}

    async def read(outputs):
        async for out in outputs:
            arrived["failed" if isinstance(out, Failed) else out] = trio.current_time()

    with trio.move_on_after(cancel_at if cancel_at is not None else 60):
        async with pipeline.open(outputs=True) as flow, trio.open_nursery() as nursery:
            nursery.start_soon(read, flow.outputs)
            for i in range(300):  # instant items: both stages take chunks from now on
                await flow.send(i)
            await trio.sleep(0.1)
            for x in ["bad", "embed", 1000, "slow", 1001, 1002, 1003]:
                flow.send_nowait(x)  # no checkpoint between: they travel as one chunk
            flow.close()
    result = flow.result
    t = arrived[1000]
    assert t == pytest.approx(0.1)
    for x in (1001, 1002, 1003, "failed"):
        assert arrived[x] == pytest.approx(t)
    s = result.stats["work"]
    if cancel_at is None:
        assert arrived["slow"] == pytest.approx(t + 1)
        assert ["bad"] == [f.item for f in dead]
        assert (1, 1) == (s.failed, s.passed)
        assert 300 + 5 == s.ok
    else:
        assert "slow" not in arrived
        assert ("work", "slow") in result.unfinished
    assert_balanced(result, pipeline)


async def test_a_fail_fast_failure_in_a_quick_chunk_starts_nothing_after_it(autojump_clock):
    """A quick stage takes waiting items as one chunk; when one of them fails under
    fail-fast, the items after it in the chunk never start (as if each ran alone), and
    they are listed as unfinished."""
    started = []

    @stage(workers=1, buffer=16)
    async def charge(x):
        started.append(x)
        if x == "declined":
            raise RuntimeError("card declined")
        return x

    async def feed():
        async with Pipeline(charge).open() as flow:
            for i in range(300):  # instant items: the stage takes chunks from now on
                await flow.send(i)
            await trio.sleep(0.1)
            for x in [1000, "declined", 1001, 1002]:
                flow.send_nowait(x)  # no checkpoint between: they travel as one chunk
            await trio.sleep(1)

    with pytest.raises(StageError) as info:
        await feed()
    assert started[-2:] == [1000, "declined"]
    result = info.value.result
    assert {("charge", 1001), ("charge", 1002)} <= set(result.unfinished)
    assert_balanced(result)


def _ordered_chain(rng, errors, dead):
    """2-4 ordered plain-map stages of mixed kinds and sizes; each fails some items.
    Returns the pipeline and, per stage, the modulus that decides its failures."""
    stages, moduli = [], []
    for i in range(rng.randint(2, 4)):
        kind = rng.choice(["async", "async", "thread", "inline"])
        every = rng.choice([5, 7, 13])
        options = {
            "workers": rng.choice([1, 2, 4, 8]),
            "ordered": True,
            "errors": errors,
            "buffer": rng.choice([1, 4, 16]),
            "name": f"s{i}_{kind}",
            "dead_letter": dead.append,
        }

        def check(x, i=i, every=every):
            if x % every == i + 1:
                raise ValueError(f"stage {i} fails on {x}")

        if kind == "async":

            @stage(**options)
            async def work(x, check=check):
                if x % 3 == 0:
                    await trio.sleep(0.001 * (x % 7))
                check(x)
                return x

        elif kind == "thread":

            @stage(**options)
            def work(x, check=check):
                check(x)
                return x

        else:

            @stage(**options, run_in="task")
            def work(x, check=check):
                check(x)
                return x

        stages.append(work)
        moduli.append(every)
    chain = stages[0]
    for st in stages[1:]:
        chain = chain | st
    return Pipeline(chain), moduli


@pytest.mark.parametrize("seed", range(16))
async def test_ordered_chains_restore_input_order_once_with_holes(seed, autojump_clock):
    """A run of ordered stages (sharing one window: the order is restored once, after
    the last) with failures in every stage under skip, collect or embed: the outputs are
    the input order without the failed items (embed: a Failed value in their place),
    every failure reaches the dead-letter sink, and the counts balance."""
    rng = random.Random(seed)
    errors = rng.choice(["skip", "collect", "embed"])
    dead = []
    pipeline, moduli = _ordered_chain(rng, errors, dead)
    n = 400
    result = await pipeline.arun(range(n))
    failed = {x for x in range(n) if any(x % m == i + 1 for i, m in enumerate(moduli))}
    expected = [("failed", x) if x in failed else x for x in range(n)]
    if errors != "embed":
        expected = [x for x in expected if type(x) is int]
    got = [("failed", o.item) if isinstance(o, Failed) else o for o in result.outputs]
    assert got == expected
    assert sorted(f.item for f in dead) == sorted(failed)
    assert_balanced(result, pipeline)


async def test_a_hole_that_waits_for_a_slow_reader_is_blocked_time_not_busy(autojump_clock):
    """In an order-once group, a failure in the first stage leaves a hole; handing on
    the outputs that hole completes can wait for a slow reader. That wait is the first
    stage's blocked time, never its busy time (only its own 0.5 s sleeps are)."""

    @stage(workers=2, ordered=True, errors="skip")
    async def first(x):
        if x % 2:
            await trio.sleep(0.5)  # the items after it are done (and wait) meanwhile
            raise ValueError(x)
        return x

    @stage(workers=2, ordered=True)
    async def second(x):
        return x

    seen = []
    async with Pipeline(first | second).stream(range(20), buffer=0) as outputs:
        async for out in outputs:
            seen.append(out)
            await trio.sleep(1)
    assert list(range(0, 20, 2)) == seen
    s = outputs.result.stats["first"]
    assert s.busy_seconds == pytest.approx(10 * 0.5)
    assert s.blocked_seconds > 0
    assert (10, 10) == (s.ok, s.failed)


@pytest.mark.parametrize("buffer", [0, 1])
async def test_a_send_refused_with_pipeline_closed_is_not_counted_as_taken(buffer, autojump_clock):
    """Feeders blocked in `await flow.send(x)` when the block ends normally: each send
    either returns (the item ran) or raises PipelineClosed (the caller keeps it). A
    refused item is not counted in the stage or listed in result.unfinished (before the
    fix it was both, so resuming unfinished and retrying the refused items ran it twice)."""

    @stage(workers=1, buffer=buffer)
    async def slow(x):
        await trio.sleep(0.01)
        return x

    accepted, refused = [], []

    async def feeder(flow, base):
        for i in itertools.count(base):
            try:
                await flow.send(i)
            except PipelineClosed:
                refused.append(i)
                return
            accepted.append(i)

    async with trio.open_nursery() as nursery, Pipeline(slow).open() as flow:
        for f in range(3):
            nursery.start_soon(feeder, flow, 1000 * f)
        await trio.sleep(0.05)
    result = flow.result
    assert len(refused) == 3
    assert result.unfinished == []
    stats = result.stats["slow"]
    assert (stats.items_in, stats.ok, stats.cancelled) == (len(accepted), len(accepted), 0)
    assert_balanced(result)
    assert_nothing_left_running()


@pytest.mark.parametrize("errors", ["skip", "embed", "collect"])
async def test_a_stop_during_a_dead_letter_call_loses_no_failed_item(errors, autojump_clock):
    """An outer cancellation while an async dead-letter function is still working on a
    failed item (it would have kept it after its await): the item is in
    result.unfinished and counted cancelled, not failed (before the fix, under skip and
    embed it was counted failed and was nowhere else)."""
    kept = []

    async def keep(failed):
        await trio.sleep(10)
        kept.append(failed.item)

    result = await failing_stream_cut_at_1s(errors, keep)
    assert kept == []
    # 0 was in the dead-letter call; 1 and 2 queued (the source is pulled only as far as
    # the stage has room).
    assert sorted(x for _, x in result.unfinished) == [0, 1, 2]
    stats = result.stats["bad"]
    assert (stats.failed, stats.cancelled, len(result.errors)) == (0, 3, 0)
    assert_balanced(result)
    assert_nothing_left_running()
