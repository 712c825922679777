"""Bottleneck analysis by Little's Law, on pipelines whose bottleneck is known, under
``autojump_clock`` so every figure is exact."""

from __future__ import annotations

import math

import pytest
import trio

from pipeflow import Pipeline, stage


@stage(workers=4)
async def parse(x):
    return x


@stage(workers=2)
async def enrich(x):
    """The known bottleneck: 2 workers x 0.5 s = 4 items/s at most."""
    await trio.sleep(0.5)
    return x


@stage
async def store(x):
    return x


async def test_two_workers_of_half_a_second_make_four_items_per_second(autojump_clock):
    """Fed fast, 2 workers x 0.5 s run at 4 items/s, fully utilised (L = 2 busy
    workers), and are named the bottleneck; sizing for 70% asks for 3 workers."""
    result = await Pipeline(parse | enrich | store).arun(range(20))
    assert 5.0 == result.elapsed
    assert "enrich" == result.bottleneck
    s = result.stats["enrich"]
    assert (4.0, 0.5, 2.0, 1.0, 1.0) == (
        s.throughput,
        s.duration_mean,
        s.load,
        s.utilisation,
        s.busy_fraction,
    )
    assert 3 == s.recommended_workers  # ceil(2 / 0.7)
    # The stages around it run at its pace, idle: nothing to add there.
    for name in ("parse", "store"):
        other = result.stats[name]
        assert (4.0, 0.0, 1) == (other.throughput, other.utilisation, other.recommended_workers)
    # parse's workers spent the run waiting for room in enrich's queue: backpressure.
    # Its items are instant, so a worker takes those already waiting in one chunk: how
    # many of its 4 workers wait at once depends on how the scheduler (which trio
    # shuffles on purpose) spreads the chunks, but one at least waits from the start
    # until 3.5 s, and none after the last outputs enter enrich's queue at 4.0 s (items
    # 2j and 2j+1 enter it at (j - 1) x 0.5 s: its two workers hold 0 and 1 from 0 s).
    parse_stats = result.stats["parse"]
    assert 3.5 <= parse_stats.blocked_seconds <= 4 * 4.0
    assert parse_stats.blocked_seconds > 10 * parse_stats.busy_seconds
    assert "enrich" == result.to_dict()["bottleneck"]


async def test_a_stage_waiting_on_its_successor_is_not_the_bottleneck(autojump_clock):
    """prep (0.25 s per item) spends most of its time blocked handing items to slow
    (1 s per item): slow is the bottleneck, and prep's blocked time shows why."""

    @stage
    async def prep(x):
        await trio.sleep(0.25)
        return x

    @stage
    async def slow(x):
        await trio.sleep(1.0)
        return x

    result = await Pipeline(prep | slow).arun(range(8))
    assert "slow" == result.bottleneck
    p, s = result.stats["prep"], result.stats["slow"]
    # slow starts at 0.25 s and then works 8 x 1 s without a break.
    assert 8.25 == result.elapsed
    assert (8.0, 8.0 / 8.25) == (s.busy_seconds, s.busy_fraction)
    # prep works 8 x 0.25 s; the rest of its life it waits for slow to take an item:
    # 0.5 s for the third item, then 0.75 s for each of the last five.
    assert (2.0, 4.25) == (p.busy_seconds, p.blocked_seconds)
    assert p.blocked_seconds > p.busy_seconds
    assert p.busy_fraction < 0.5 < s.busy_fraction


async def test_a_blocked_chain_names_the_stage_at_its_end(autojump_clock):
    """Backpressure cascades: a and b both wait on c; c is named."""

    @stage
    async def a(x):
        await trio.sleep(0.125)
        return x

    @stage
    async def b(x):
        await trio.sleep(0.25)
        return x

    @stage
    async def c(x):
        await trio.sleep(1.0)
        return x

    result = await Pipeline(a | b | c).arun(range(10))
    assert "c" == result.bottleneck
    assert result.stats["a"].blocked_seconds > 0
    assert result.stats["b"].blocked_seconds > result.stats["b"].busy_seconds


async def test_the_first_stage_can_be_the_bottleneck(autojump_clock):
    """A slow first stage starves the ones after it: it is named, they are idle."""

    @stage(workers=2)
    async def fetch(x):
        await trio.sleep(1.0)
        return x

    result = await Pipeline(fetch | parse | store).arun(range(10))
    assert "fetch" == result.bottleneck
    assert 0.0 == result.stats["parse"].blocked_seconds


@pytest.mark.parametrize(
    ("workers", "recommended"),
    [
        (1, 2),  # L = 1: ceil(1 / 0.7) = 2
        (4, 6),  # L = 4: ceil(5.71) = 6
        (7, 10),  # L = 7: exactly 70% at 10 workers, not 11
    ],
)
async def test_recommended_workers_by_littles_law_at_70_percent(
    autojump_clock, workers, recommended
):
    """A saturated pool of N workers x 1 s carries L = N busy workers; running that
    rate at 70% takes ceil(L / 0.7) workers."""

    @stage(workers=workers)
    async def work(x):
        await trio.sleep(1.0)
        return x

    result = await Pipeline(work).arun(range(workers * 10))
    s = result.stats["work"]
    assert (10.0, float(workers), float(workers), 1.0) == (
        result.elapsed,
        s.throughput,
        s.load,
        s.utilisation,
    )
    assert recommended == s.recommended_workers
    # Little's Law checked against the measurement: L = λW = busy seconds / elapsed.
    assert s.load == s.busy_seconds / result.elapsed


async def test_constant_durations_give_exact_mean_and_quantiles(autojump_clock):
    """Every item takes 0.375 s: mean, p50, p99 and max are exactly 0.375."""

    @stage(workers=3)
    async def steady(x):
        await trio.sleep(0.375)
        return x

    s = (await Pipeline(steady).arun(range(30))).stats["steady"]
    assert (0.375, 0.375, 0.375, 0.375) == (
        s.duration_mean,
        s.duration_p50,
        s.duration_p99,
        s.duration_max,
    )


async def test_p99_follows_the_tail_within_a_bucket(autojump_clock):
    """With 3 slow items in 100, p99 is the slow latency (within the histogram's ~10%
    bucket width), p50 the fast one, and the mean is exact."""

    @stage(workers=4)
    async def tail(x):
        await trio.sleep(2.0 if x % 33 == 32 else 0.25)
        return x

    s = (await Pipeline(tail).arun(range(100))).stats["tail"]
    assert (0.25, 2.0) == (s.duration_p50, s.duration_max)
    assert math.isclose(2.0, s.duration_p99, rel_tol=0.1)
    assert (97 * 0.25 + 3 * 2.0) / 100 == s.duration_mean


async def test_queue_wait_and_conservation(autojump_clock):
    """Queue wait is the time an item waited for a worker; every stage accounts for
    each input as ok, filtered, failed or dropped."""

    @stage(errors="skip")
    async def check(x):
        if x == 5:
            raise ValueError(x)
        if x % 2:
            yield x

    result = await Pipeline(enrich | check).arun(range(8))
    for s in result.stats.values():
        assert s.items_in == s.ok + s.filtered + s.failed + s.dropped
    c = result.stats["check"]
    assert (8, 3, 4, 1, 3) == (c.items_in, c.ok, c.filtered, c.failed, c.items_out)
    # enrich (2 workers x 0.5 s, a buffer of 2): items 0 and 1 go straight to the
    # workers, 2 and 3 wait in the buffer 0.5 s. Waiting starts when the source offers
    # an item: item 4, offered at 0 while the buffer was full, is taken at 1.0; item 5,
    # offered at 0.5, at 1.0 too. Waits 0, 0, .5, .5, 1, .5, 1, .5 seconds.
    e = result.stats["enrich"]
    assert 0.5 == e.queue_wait_mean
    assert math.isclose(1.0, e.queue_wait_p99, rel_tol=0.1)


async def test_queue_wait_of_a_chunk_whose_item_waits(autojump_clock):
    """The outputs a chunk hands on before its waiting item finishes do not change the
    queue wait it records (the envelopes travel on as outputs, restamped)."""

    @stage(buffer=8)
    async def work(x):
        if x == 0:
            await trio.sleep(3)  # slow: the next item is taken alone, at 3
        elif x == 3:
            await trio.sleep(1)  # waits inside the chunk [2, 3, 4, 5] taken at 3
        return x

    @stage
    async def after(x):
        return x

    result = await Pipeline(work | after).arun(range(6))
    assert list(range(6)) == sorted(result.outputs)
    # All six queued at 0. Taken at 0 (item 0), 3 (item 1), 3 (items 2 and 3: 4 and 5
    # go back when 3 waits), 4 (items 4 and 5): waits 0, 3, 3, 3, 4, 4.
    s = result.stats["work"]
    assert math.isclose(17 / 6, s.queue_wait_mean)


async def test_a_stage_held_up_by_a_slow_consumer_is_not_the_bottleneck(autojump_clock):
    """The consumer of stream() reads one output a second, with no buffer between them;
    quick (0.125 s per item) spends most of its time blocked sending: it does not limit
    throughput."""

    @stage
    async def quick(x):
        await trio.sleep(0.125)
        return x

    async with Pipeline(quick).stream(range(8), buffer=0) as outputs:
        async for _ in outputs:
            await trio.sleep(1.0)
    s = outputs.result.stats["quick"]
    assert s.blocked_seconds > 5 * s.busy_seconds
    assert "quick" != outputs.result.bottleneck


async def test_a_slow_source_leaves_no_stage_to_blame(autojump_clock):
    """The source yields one item a second; quick is busy 12% of the time and limits
    nothing."""

    @stage
    async def quick(x):
        await trio.sleep(0.125)
        return x

    async def ticks():
        for i in range(8):
            await trio.sleep(1.0)
            yield i

    result = await Pipeline(quick).arun(ticks())
    assert result.stats["quick"].busy_fraction < 0.2
    assert "quick" != result.bottleneck
