"""Flow control: entry backpressure (block / reject / drop), rate limits, batching,
keyed routing, autoscaling, process workers and per-worker resources."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import random

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from pipeflow import Pipeline, PipelineFull, StageError, stage
from pipeflow.testing import assert_nothing_left_running

from . import cpu_work

# -- Pipeline.open(): the three entry strategies ------------------------------------------


def gated_pipeline(gate: trio.Event, seen: list[int]) -> Pipeline[int, int]:
    @stage(workers=1, buffer=2)
    async def held(x):
        await gate.wait()
        seen.append(x)
        return x

    return Pipeline(held)


async def test_open_send_blocks_while_full():
    """Block: send waits while the worker is busy and the buffer full."""
    gate, seen = trio.Event(), []
    async with gated_pipeline(gate, seen).open() as flow:
        for i in range(3):  # 1 in the worker, 2 in the buffer
            await flow.send(i)
        with trio.move_on_after(0.05) as scope:
            await flow.send(3)
        assert scope.cancelled_caught
        gate.set()
        await flow.send(3)
    assert [0, 1, 2, 3] == seen
    assert flow.result is not None
    assert 4 == flow.result.stats["held"].items_out


async def test_open_send_nowait_rejects_when_full():
    """Reject: send_nowait raises PipelineFull at once (an HTTP 429)."""
    gate, seen = trio.Event(), []
    async with gated_pipeline(gate, seen).open() as flow:
        flow.send_nowait(0)
        await trio.testing.wait_all_tasks_blocked()  # the worker takes item 0
        flow.send_nowait(1)
        flow.send_nowait(2)
        with pytest.raises(PipelineFull, match="stage 'held' has 2 queued items"):
            flow.send_nowait(3)
        gate.set()
    assert [0, 1, 2] == seen


async def test_open_offer_drops_and_counts():
    """Drop: offer returns False when full and the drop is counted; nothing is lost
    silently: items_in = ok + dropped."""
    gate, seen = trio.Event(), []
    async with gated_pipeline(gate, seen).open() as flow:
        assert flow.offer(0)
        await trio.testing.wait_all_tasks_blocked()
        assert [True, True, False, False] == [flow.offer(i) for i in range(1, 5)]
        gate.set()
    stats = flow.result.stats["held"]
    assert (5, 3, 2) == (stats.items_in, stats.ok, stats.dropped)
    assert [0, 1, 2] == seen


async def test_open_leaving_waits_for_every_accepted_item(autojump_clock):
    """Leaving the block ends the input and waits until accepted items have left."""

    @stage(workers=2)
    async def slow(x):
        await trio.sleep(1)
        return x

    async with Pipeline(slow).open() as flow:
        for i in range(4):
            await flow.send(i)
    assert 2.0 == trio.current_time()
    assert 4 == flow.result.stats["slow"].items_out
    assert_nothing_left_running()


async def test_open_with_outputs_delivers_them_with_backpressure():
    """outputs=True: the caller reads outputs as they come, in another task."""

    @stage(workers=2)
    async def square(x):
        return x * x

    got = []
    async with Pipeline(square).open(outputs=True) as flow, trio.open_nursery() as nursery:

        async def read():
            async for out in flow.outputs:
                got.append(out)

        nursery.start_soon(read)
        for i in range(10):
            await flow.send(i)
        flow.close()
    assert sorted(i * i for i in range(10)) == sorted(got)


# -- rate= ---------------------------------------------------------------------------------


async def test_rate_limit_is_shared_by_all_workers(autojump_clock):
    """rate=50 with 64 workers (the Go worker-pool guide's scraper): 50 calls per second, no more."""
    starts = []

    @stage(workers=64, rate=50)
    async def fetch(x):
        starts.append(trio.current_time())
        await trio.sleep(0.5)
        return x

    await Pipeline(fetch).arun(range(100))
    assert [i * 0.02 for i in range(100)] == pytest.approx(starts)


async def test_rate_limit_allows_a_burst(autojump_clock):
    """burst=5: five calls at once, then one every 1/rate seconds."""
    starts = []

    @stage(workers=10, rate=10, burst=5)
    async def call(x):
        starts.append(trio.current_time())
        return x

    await Pipeline(call).arun(range(8))
    assert [0, 0, 0, 0, 0, 0.1, 0.2, 0.3] == pytest.approx(starts)


# -- batch= --------------------------------------------------------------------------------


async def test_batches_flush_when_full_after_timeout_and_at_end(autojump_clock):
    """Lists of up to N items; a partial batch leaves T seconds after its first item
    arrived, and the last one at the end of the stream."""
    seen = []

    @stage(batch=3, batch_timeout=0.5)
    async def write(rows):
        seen.append((trio.current_time(), rows))
        return len(rows)

    async def source():
        for i in range(4):  # a full batch at t=0, item 3 waits
            yield i
        await trio.sleep(2)
        yield 4  # a new batch starts at t=2 ...
        await trio.sleep(0.2)
        yield 5  # ... and is flushed by its timeout at t=2.5
        await trio.sleep(1)
        yield 6  # the end of the stream flushes the last one at once

    result = await Pipeline(write).arun(source())
    assert [(0, [0, 1, 2]), (0.5, [3]), (2.5, [4, 5]), (3.2, [6])] == seen
    stats = result.stats["write"]
    assert (7, 7, 4) == (stats.items_in, stats.ok, stats.items_out)
    assert [3, 1, 2, 1] == result.outputs


async def test_seed_batch_writer_1000_rows_or_100ms(autojump_clock):
    """The Go guide's batch DB writer: 1000 rows or 100 ms, whichever first, 8 writers."""
    batches = []

    @stage(workers=8, batch=1000, batch_timeout=0.1)
    async def insert(rows):
        batches.append((trio.current_time(), len(rows)))
        await trio.sleep(0.01)

    async def events():
        for i in range(2500):
            yield i
        await trio.sleep(1)

    await Pipeline(insert).arun(events())
    assert [(0, 1000), (0, 1000), (0.1, 500)] == batches


async def test_a_failed_batch_counts_its_items(autojump_clock):
    """A failing batch fails all its items: conservation holds in items."""

    @stage(batch=2, errors="collect")
    async def write(rows):
        if 3 in rows:
            raise ValueError("bad row")
        return rows

    result = await Pipeline(write).arun(range(5))
    stats = result.stats["write"]
    assert (5, 3, 2) == (stats.items_in, stats.ok, stats.failed)
    assert [[2, 3]] == [e.item for e in result.errors]


# -- key= ----------------------------------------------------------------------------------


async def test_keyed_stage_one_at_a_time_per_key_in_order(autojump_clock):
    """Same key: same worker, one at a time, input order; keys run in parallel."""
    rng = random.Random(7)
    delays = {i: rng.choice([0.1, 0.5, 1, 2]) for i in range(60)}
    active: dict[str, int] = {}
    order: dict[str, list[int]] = {}
    workers_of: dict[str, set[int]] = {}
    peak = 0

    @stage(workers=4, key=lambda item: item[0])
    async def handle(item):
        nonlocal peak
        user, i = item
        active[user] = active.get(user, 0) + 1
        assert 1 == active[user]
        peak = max(peak, sum(active.values()))
        order.setdefault(user, []).append(i)
        workers_of.setdefault(user, set()).add(id(trio.lowlevel.current_task()))
        await trio.sleep(delays[i])
        active[user] -= 1
        return item

    items = [(f"user{rng.randrange(6)}", i) for i in range(60)]
    result = await Pipeline(handle).arun(items)
    assert sorted(items) == sorted(result.outputs)
    for user, seen in order.items():
        assert [i for u, i in items if u == user] == seen
        assert 1 == len(workers_of[user])
    assert peak > 1


def test_routing_hash_is_stable_across_processes():
    """Routing does not use Python's per-process randomised hash(): two interpreters
    with different hash seeds route the same keys the same way."""
    import os
    import subprocess
    import sys

    code = "from pipeflow._run import stable_hash; print([stable_hash(k) for k in ['user-42', ('a', 1), 7, b'x']])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert 1 == len(outputs)


async def test_key_function_errors_fail_the_item_by_policy():
    """A key function that raises fails that item under the stage's policy."""

    @stage(workers=2, key=lambda x: 10 // x, errors="collect")
    async def invert(x):
        return x

    result = await Pipeline(invert).arun([1, 0, 2])
    assert [1, 2] == sorted(result.outputs)
    assert [0] == [e.item for e in result.errors]
    assert isinstance(result.errors[0].__cause__, ZeroDivisionError)


async def test_keyed_stage_can_also_be_ordered(autojump_clock):
    """ordered=True with key=: per-key order and global input order."""

    @stage(workers=3, key=lambda x: x % 3, ordered=True)
    async def work(x):
        await trio.sleep((7 * x) % 5)
        return x

    assert list(range(40)) == (await Pipeline(work).arun(range(40))).outputs


# -- workers=(min, max) --------------------------------------------------------------------


async def test_autoscaling_grows_under_load_and_shrinks_when_idle(autojump_clock):
    """Grows by half at the high watermark, never above max; retires idle workers,
    never below min; every decision is logged."""
    gate = trio.Event()
    sizes = []

    @stage(workers=(2, 8), buffer=8)
    async def work(x):
        await gate.wait()
        return x

    async def keep_full(flow):
        for i in range(100):  # more than the pool can hold: the sender waits
            await flow.send(i)

    with capture_logs() as logs:
        async with Pipeline(work).open() as flow:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_full, flow)
                await trio.sleep(0.5)
                for _ in range(5):  # decisions at t=1, 2, 3, 4, 5
                    await trio.sleep(1)
                    sizes.append(flow.stats()["work"].workers)
                gate.set()
            await trio.sleep(40)  # idle: extra workers retire
            sizes.append(flow.stats()["work"].workers)
    assert [3, 4, 6, 8, 8, 2] == sizes
    scaled = [e for e in logs if e["event"] == "workers_scaled"]
    assert (2, 3) == (scaled[0]["old"], scaled[0]["new"])
    assert "queue 100% full" == scaled[0]["reason"]
    assert min(e["new"] for e in scaled) == 2


async def test_autoscaling_retires_idle_workers_when_it_says_so(autojump_clock):
    """Every shrink the autoscaler logs is carried out at once by an idle worker (not
    when that worker's next item or idle spell comes), so the pool the figures show is
    the one the log says; and no decision is left pending to shrink a later burst."""
    busy = trio.Event()

    @stage(workers=(1, 8), buffer=8)
    async def work(x):
        await busy.wait()
        return x

    async def burst(flow, n):
        for i in range(n):
            await flow.send(i)

    with capture_logs() as logs:
        async with Pipeline(work).open() as flow:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst, flow, 100)
                await trio.sleep(10)
                assert flow.stats()["work"].workers == 8
                busy.set()
            start = len(logs)
            await trio.sleep(0.5)  # look between the autoscaler's decisions (every 1 s)
            for _ in range(25):  # idle: one fewer every cool-down (5 s)
                await trio.sleep(1)
                said = [e for e in logs[start:] if e["event"] == "workers_scaled"]
                if said:
                    assert flow.stats()["work"].workers == said[-1]["new"], said
            assert flow.stats()["work"].workers == 3
            busy = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst, flow, 100)
                sizes = []
                for _ in range(8):  # a second burst: the pool only grows
                    await trio.sleep(1)
                    sizes.append(flow.stats()["work"].workers)
                busy.set()
    assert sizes == sorted(sizes), sizes
    assert sizes[-1] == 8, sizes
    shrinks = [e for e in logs if e["event"] == "workers_scaled" and e["new"] < e["old"]]
    assert [(e["old"], e["new"]) for e in shrinks] == [(8, 7), (7, 6), (6, 5), (5, 4), (4, 3)]


async def test_autoscaling_keeps_a_spare_worker_while_one_is_stuck(autojump_clock):
    """One item stuck in a 120 s call, the rest light (10 items/s, 50 ms each): the
    stage grows to 2 and stays there. It used to shrink back to 1 whenever the queue
    emptied (one of the two was busy: "not all busy"), leaving only the stuck worker:
    the queue filled, it grew again, 9 times in 2 minutes, items waiting each time."""

    @stage(workers=(1, 4))
    async def work(x):
        await trio.sleep(120 if x == 0 else 0.05)
        return x

    async def paced():
        for i in range(1200):
            yield i
            await trio.sleep(0.1)

    with capture_logs() as logs:
        result = await Pipeline(work).arun(paced(), collect=False)
    assert 1200 == result.stats["work"].ok
    scaled = [(e["old"], e["new"]) for e in logs if e["event"] == "workers_scaled"]
    assert [(1, 2)] == scaled
    # Once the second worker came, no item waited for the stuck one.
    assert result.stats["work"].queue_wait_p99 < 0.5


def test_key_with_autoscaling_is_refused():
    """key= needs a fixed pool."""
    with pytest.raises(ValueError, match="key= needs a fixed number of workers"):
        stage(workers=(1, 4), key=str)(cpu_work.sum_squares)


# -- run_in="process" ----------------------------------------------------------------------


async def test_process_stage_runs_in_worker_processes_and_leaves_none():
    """CPU-bound functions run in other processes; none is left after the run."""
    import os

    square_sums = stage(run_in="process", workers=2)(cpu_work.sum_squares)
    pids = stage(run_in="process", workers=2, name="pids")(cpu_work.worker_pid)
    result = await Pipeline(square_sums | pids).arun([10, 20, 30])
    assert os.getpid() not in result.outputs
    assert [] == multiprocessing.active_children()


async def test_a_dying_worker_process_fails_its_item_and_the_stage_goes_on():
    """A worker process that dies fails that item with a clear error; a new process
    takes the next items."""
    doubler = stage(run_in="process", workers=1, errors="collect")(cpu_work.die_on_negative)
    result = await Pipeline(doubler).arun([1, -1, 2, 3])
    assert [2, 4, 6] == sorted(result.outputs)
    (error,) = result.errors
    assert -1 == error.item
    assert "died unexpectedly" in str(error)
    assert [] == multiprocessing.active_children()


def test_process_stage_must_pickle_when_the_pipeline_is_built():
    """A lambda or closure cannot cross a process boundary: refused at Pipeline()."""
    with pytest.raises(TypeError, match="run_in='process' needs a function that pickles"):
        Pipeline(stage(run_in="process")(lambda x: x))


# -- resource= -----------------------------------------------------------------------------


async def test_each_worker_opens_its_resource_once(autojump_clock):
    """Per-worker resources: opened once per worker, used for all its items, closed on
    every exit path (here: a timeout cancels the run)."""
    events = []

    @contextlib.asynccontextmanager
    async def client():
        events.append("open")
        try:
            yield len(events)
        finally:
            events.append("close")

    @stage(workers=3, resource=client)
    async def call(x, conn):
        await trio.sleep(1)
        return conn

    result = await Pipeline(call).arun(range(9))
    assert 3 == len(set(result.outputs))
    assert 3 == events.count("open") == events.count("close")

    events.clear()
    with trio.move_on_after(1.5):
        await Pipeline(call).arun(range(100))
    assert ["open"] * 3 + ["close"] * 3 == events


async def test_a_resource_that_never_opens_does_not_keep_a_finished_run_alive(autojump_clock):
    """One worker's resource never opens (a connect without a timeout); the other
    workers do every item. Once the input has ended and nothing is left for it, the
    worker still opening is ended (its open cancelled) and the run finishes."""
    opened = itertools.count()
    ended = []

    @contextlib.asynccontextmanager
    async def connection():
        k = next(opened)
        try:
            if k == 1:
                await trio.sleep_forever()
            yield k
        finally:
            ended.append(k)

    @stage(workers=3, resource=connection)
    async def call(x, conn):
        await trio.sleep(0.01)
        return x

    with trio.fail_after(60):
        result = await Pipeline(call).arun(range(30))
    assert sorted(result.outputs) == list(range(30))
    assert result.stats["call"].ok == 30
    assert sorted(ended) == [0, 1, 2]  # the hung open was ended too
    assert trio.current_time() < 1


def never_opens(ended: list[str]):
    """A resource whose open never returns (a connect without a timeout); each open
    that is ended adds "never" to ``ended``."""

    @contextlib.asynccontextmanager
    async def never():
        try:
            await trio.sleep_forever()
            yield None
        finally:
            ended.append("never")

    return never


async def test_a_stage_whose_every_worker_is_opening_ends_when_its_input_ends_empty(
    autojump_clock,
):
    """No worker of a stage ever opens its resource, and no item ever comes for it (an
    empty source; a dead-letter stage when nothing fails): once its input has ended
    there is nothing for it to do, so its opens are ended and the run finishes."""
    ended = []

    never = never_opens(ended)

    @stage(workers=2, resource=never)
    async def call(x, conn):
        return x

    # The source may end before the workers start opening, or after (Trio runs tasks
    # started together in either order): 20 runs see both.
    for _ in range(20):
        ended.clear()
        with trio.fail_after(60):
            result = await Pipeline(call).arun([])
        assert [] == result.outputs
        assert ["never", "never"] == ended

    @stage(name="sink", resource=never)
    async def sink(failed, conn):
        pass

    @stage(errors="skip", dead_letter=sink)
    async def fine(x):
        return x

    ended.clear()
    with trio.fail_after(60):
        result = await Pipeline(fine).arun(range(3))
    assert [0, 1, 2] == result.outputs
    assert ["never"] == ended

    ended.clear()  # open(): the block ends, no item sent
    with trio.fail_after(60):
        async with Pipeline(call).open() as flow:
            await trio.sleep(0.5)
    assert 0 == flow.result.stats["call"].items_in
    assert ["never", "never"] == ended
    assert trio.current_time() < 2


@pytest.mark.parametrize("shape", ["after a stage", "batched", "keyed"])
async def test_a_stage_whose_every_worker_is_opening_ends_wherever_its_input_ends(
    autojump_clock, shape
):
    """As above, for the other ways a stage's input ends: the stage before it ends
    (here it passed no item on), or the shaper in front of its workers does (a
    batcher's, a key router's). No item ever comes, so the opens are ended."""
    ended = []

    never = never_opens(ended)

    @stage
    async def none_pass(x):
        return
        yield  # an async generator that yields nothing: every item filtered

    options = {"batched": {"batch": 4}, "keyed": {"key": lambda x: x}}.get(shape, {})

    @stage(workers=2, resource=never, **options)
    async def call(x, conn):
        return x

    pipeline = Pipeline(none_pass | call) if shape == "after a stage" else Pipeline(call)
    source = range(5) if shape == "after a stage" else []
    # The input may end before the workers start opening, or after: 20 runs see both.
    for _ in range(20):
        ended.clear()
        with trio.fail_after(60):
            result = await pipeline.arun(source)
        assert [] == result.outputs
        assert ["never", "never"] == ended
        assert 0 == result.stats["call"].items_in


async def aborted_connect():
    """A connect that turns its cancellation into an error of its own."""
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        raise OSError("connect aborted") from None


@pytest.mark.parametrize("inside", ["the open", "a nursery in the open"])
async def test_an_open_that_raises_when_it_is_ended_is_logged_not_the_runs_failure(
    autojump_clock, inside
):
    """A connect that turns the cancellation into an error of its own when the runner
    ends it (no item is left for its worker), in the open itself or in a task of a
    nursery inside it (a happy-eyeballs connect): the run keeps its result, since no
    item needed that worker, and the error is logged naming the stage and the resource."""
    opens = itertools.count()

    @contextlib.asynccontextmanager
    async def connect():
        if next(opens) == 1:
            if inside == "the open":
                await aborted_connect()
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(aborted_connect)
                    await trio.sleep_forever()
        yield "conn"

    @stage(workers=2, resource=connect)
    async def call(x, conn):
        await trio.sleep(0.01)
        return x

    with capture_logs() as logs, trio.fail_after(60):
        result = await Pipeline(call).arun(range(5))
    assert [0, 1, 2, 3, 4] == sorted(result.outputs)
    assert 5 == result.stats["call"].ok
    (event,) = [e for e in logs if e["event"] == "resource_open_end_failed"]
    assert "error" == event["log_level"]
    assert "call" == event["stage"]
    assert "resource=connect()" == event["resource"]
    assert "OSError: connect aborted" == event["error"]


@pytest.mark.parametrize("source", [[], range(5)])
async def test_an_open_that_fails_on_its_own_stops_the_run_even_once_ended(autojump_clock, source):
    """An open that fails with no cancellation behind it stops the run, noted with the
    stage and the resource: also when its input had already ended and the runner had
    asked it to stop before it ran (it failed before its first checkpoint). Trio starts
    the source's task and the workers in either order: 20 runs see both."""

    @contextlib.asynccontextmanager
    async def refused():
        raise ConnectionRefusedError("no server")
        yield

    @stage(workers=2, resource=refused)
    async def other(x, conn):
        return x

    for _ in range(20):
        with capture_logs() as logs, pytest.raises(ConnectionRefusedError) as caught:
            with trio.fail_after(60):
                await Pipeline(other).arun(source)
        assert "stage 'other': its resource resource=refused() failed to open" in (
            caught.value.__notes__
        )
        assert not [e for e in logs if e["event"] == "resource_open_end_failed"]


async def test_a_keyed_worker_still_opening_keeps_its_items_when_another_is_done(
    autojump_clock,
):
    """A key= stage: each worker has its own items. One worker opens at once and does
    its keys; the other's open takes 5 s. The first finishing does not end the second's
    open: its items wait for it, and every item is done."""
    opened = itertools.count()

    @contextlib.asynccontextmanager
    async def connection():
        if next(opened) == 1:
            await trio.sleep(5)
        yield None

    @stage(workers=2, buffer=100, resource=connection, key=lambda x: x)
    async def call(x, conn):
        return x

    with trio.fail_after(60):
        result = await Pipeline(call).arun(range(6))
    assert list(range(6)) == sorted(result.outputs)
    assert [] == result.unfinished
    assert 0 == result.stats["call"].cancelled
    assert 5.0 == trio.current_time()


@pytest.mark.parametrize("items", [3, 500])
async def test_a_resource_that_cannot_open_stops_a_run_from_an_acking_source(autojump_clock, items):
    """The database is down: each worker's resource fails to open. With an acking
    source (a message queue) the run raises that error and tells the source that the
    run failed. It used to tell it the run had ended well: a source that then waits for
    the acks of the items it gave (as Redis's does) waited for ever; with more items
    than the queue holds, the run raised BrokenResourceError instead."""

    class Ack:
        def __init__(self, source):
            self.source, self.pending = source, 1

        def add(self, n):
            self.pending += n

        def done(self):
            self.pending -= 1
            if self.pending == 0:
                self.source.acked += 1
                self.source.ack_came.set()

    class Queue:
        given = acked = 0
        told = None
        ack_came = trio.Event()

        @contextlib.asynccontextmanager
        async def __pipeflow_open__(self, *, capacity):
            async def entries():
                for i in range(items):
                    await trio.lowlevel.checkpoint()
                    self.given += 1
                    yield i, Ack(self)

            try:
                yield entries()
            except BaseException as exc:
                self.told = exc
                raise
            while self.acked < self.given:  # the run ended well: its last acks
                self.ack_came = trio.Event()
                await self.ack_came.wait()

    @contextlib.asynccontextmanager
    async def database():
        await trio.sleep(0.1)
        raise ConnectionRefusedError("database down")
        yield

    @stage(workers=2, resource=database)
    async def store(x, conn):
        return x

    source = Queue()
    with trio.fail_after(60), pytest.raises(ConnectionRefusedError, match="database down"):
        await Pipeline(store).arun(source)
    assert source.told is not None  # the run failed: the source does not wait for acks
    assert 0 == source.acked


async def test_a_worker_still_opening_its_resource_leaves_the_items_to_one_that_can(
    autojump_clock,
):
    """One worker's resource never opens, the other's at once; items come one at a
    time. Each goes to the worker that can take it at once (the one opening is away),
    not to wait for an open that never ends."""
    opened = itertools.count()

    @contextlib.asynccontextmanager
    async def connection():
        if next(opened) == 0:
            await trio.sleep_forever()
        yield None

    @stage(workers=2, resource=connection)
    async def call(x, conn):
        return x

    async def trickle():
        for i in range(5):
            await trio.sleep(1)
            yield i

    with trio.fail_after(60):
        result = await Pipeline(call).arun(trickle())
    assert result.outputs == [0, 1, 2, 3, 4]
    assert result.elapsed == pytest.approx(5.0)


@pytest.mark.parametrize("gap", [20, 40])
async def test_autoscaling_does_not_retire_the_open_worker_while_others_open(autojump_clock, gap):
    """The workers the autoscaler adds cannot open their resource; after the burst it
    does not retire the one worker that can take items (the trickle after it would
    wait for ever): not as a shrink (items every 20 s), nor when it has been idle for
    30 s (items every 40 s)."""
    opened = itertools.count()

    @contextlib.asynccontextmanager
    async def connection():
        if next(opened) > 0:
            await trio.sleep_forever()
        yield None

    @stage(workers=(1, 3), resource=connection)
    async def call(x, conn):
        await trio.sleep(0.5)
        return x

    async def burst_then_trickle():
        for i in range(50):
            yield i
        for i in range(50, 55):
            await trio.sleep(gap)
            yield i

    with trio.fail_after(600):
        result = await Pipeline(call).arun(burst_then_trickle())
    assert sorted(result.outputs) == list(range(55))


async def test_autoscaling_keeps_min_workers_while_retired_ones_close_slowly(autojump_clock):
    """Closing a worker's resource takes 6 s (longer than the shrink cool-down): the
    autoscaler does not count the workers it retired, still closing, as workers it
    keeps. It used to go on retiring to no worker at all, and the run failed with
    ``BrokenResourceError`` when the next items came."""

    @contextlib.asynccontextmanager
    async def connection():
        try:
            yield None
        finally:
            await trio.sleep(6)  # a graceful close

    @stage(workers=(1, 3), resource=connection)
    async def call(x, conn):
        await trio.sleep(0.5)
        return x

    async def burst_then_trickle():
        for i in range(40):
            yield i
        await trio.sleep(100)
        for i in range(40, 45):
            await trio.sleep(1)
            yield i
        ended.set()

    pipeline = Pipeline(call)
    ended = trio.Event()
    pool = []

    async def watch():
        while not ended.is_set():
            await trio.sleep(0.5)
            stats = pipeline.current_stats()
            if stats is not None:
                pool.append(stats["call"].workers)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        with trio.fail_after(600):
            result = await pipeline.arun(burst_then_trickle())
    assert list(range(45)) == sorted(result.outputs)
    # The burst grew the pool (to 3 in most runs: the scheduler's order decides when the
    # autoscaler's ticks see the queue), and it shrank back to min_workers, never below.
    assert 2 <= max(pool) <= 3
    assert 1 == min(pool)


async def test_an_item_that_comes_as_the_autoscaler_retires_a_worker_goes_at_once(
    autojump_clock,
):
    """Quick items, one a second, on the autoscaler's ticks, after a burst grew the pool:
    an item handed over as the autoscaler woke an idle worker to retire it went at
    once. It used to wait for the next item (or, if none came, for another worker's
    30 s idle spell): the hand-over had woken no one, counting on the retiring worker."""

    @stage(workers=(1, 3))
    async def quick(x):
        if x < 30:
            await trio.sleep(1)  # a slow start: the pool grows to 3
        return x, trio.current_time()

    sent = {}

    async def burst_then_ticks():
        for i in range(30):
            sent[i] = trio.current_time()
            yield i
        for i in range(30, 90):
            await trio.sleep(1)
            sent[i] = trio.current_time()
            yield i

    late = []
    for _ in range(5):  # (which item meets a retirement depends on Trio's run order)
        with trio.fail_after(600):
            async with Pipeline(quick).stream(burst_then_ticks()) as outputs:
                async for x, done in outputs:
                    if x > 30 and done > sent[x]:  # (item 30 comes during the burst)
                        late.append((x, done - sent[x]))
    assert [] == late


def test_fail_fast_timeout_in_thread_stage_reports_timeout():
    """A thread cannot be interrupted: the stage waits for it, then reports the timeout."""
    import time

    @stage(timeout=0.05)
    def sleepy(x):
        time.sleep(0.2)
        return x

    with pytest.raises(StageError, match=r"timed out after 0\.05s"):
        Pipeline(sleepy).run([1])


def test_pipeline_error_budget_counts_failures_in_every_stage():
    """Pipeline(max_failures=N): one failure more than N, in any stage, stops the run."""
    from pipeflow import TooManyFailures

    @stage(errors="skip")
    async def odd_fails(x):
        if x % 2:
            raise ValueError(x)
        return x

    @stage(errors="collect")
    async def fours_fail(x):
        if x % 4 == 0:
            raise ValueError(x)
        return x

    result = Pipeline(odd_fails | fours_fail, max_failures=10).run(range(10))
    assert [2, 6] == sorted(result.outputs)  # 5 odd + 3 multiples of 4 = 8 failures
    with pytest.raises(TooManyFailures) as info:
        Pipeline(odd_fails | fours_fail, max_failures=7).run(range(10))
    assert "over its error budget max_failures=7" in "".join(info.value.__notes__)
    with pytest.raises(ValueError, match="max_failures= must be an int >= 0"):
        Pipeline(odd_fails, max_failures=-1)


async def test_batched_stage_load_counts_calls_not_items(autojump_clock):
    """Little's Law for a batched stage: L is workers busy on average (calls), so 2
    workers each writing a batch of 10 in 1 s, fed at once, are fully used (L = 2),
    not L = 20 from items/s x seconds per call."""

    @stage(workers=2, batch=10)
    async def write(rows):
        await trio.sleep(1)

    result = await Pipeline(write).arun(range(40))
    stats = result.stats["write"]
    assert 2.0 == result.elapsed
    assert 20.0 == stats.throughput
    assert 2.0 == stats.load
    assert 1.0 == stats.utilisation


async def test_decorated_top_level_function_runs_in_processes():
    """@stage(run_in="process") on a module-level function: the module attribute is the
    stage, and the worker process still finds the function behind it."""
    result = await Pipeline(cpu_work.cube).arun(range(5))
    assert [0, 1, 8, 27, 64] == sorted(result.outputs)
    assert 8 == cpu_work.cube(2)  # still callable as the plain function
    assert [] == multiprocessing.active_children()


async def test_fail_fast_error_carries_the_stopped_runs_result():
    """A fail-fast StageError from arun has .result with the statistics so far."""

    @stage
    async def fails_on_three(x):
        if x == 3:
            raise ValueError(x)
        return x

    with pytest.raises(StageError) as info:
        await Pipeline(fails_on_three).arun(range(10))
    stats = info.value.result.stats["fails_on_three"]
    assert (3, 1) == (stats.ok, stats.failed)


async def test_workers_waiting_for_a_rate_token_are_not_busy(autojump_clock):
    """8 workers behind rate=1/s: while they wait for tokens the stage shows 8 workers
    and none busy (the workers_busy gauge and the live views read this)."""

    @stage(workers=8, rate=1.0)
    async def limited(x):
        return x

    seen = []

    async with Pipeline(limited).open() as flow:
        for i in range(8):
            await flow.send(i)
        await trio.sleep(2.5)
        s = flow.stats()["limited"]
        seen.append((s.workers, s.busy_workers))
    assert [(8, 0)] == seen
