"""pipeflow.abc: what a connector author implements (an acking source), exercised the
way its documentation shows."""

from __future__ import annotations

import contextlib

import pytest
import trio

from pipeflow import Failed, Pipeline, StageError, stage
from pipeflow._report import describe_pipeline
from pipeflow.abc import AckingSource


class ListSource:
    """The acking source of pipeflow.abc's documentation."""

    def __init__(self, items):
        self.items = items
        self.acked = []
        self.capacity = None

    @contextlib.asynccontextmanager
    async def __pipeflow_open__(self, *, capacity):
        self.capacity = capacity

        async def pairs():
            for item in self.items:
                yield item, ItemAck(self.acked, item)

        yield pairs()


class ItemAck:
    def __init__(self, acked, item):
        self.acked, self.item, self.pending = acked, item, 1

    def add(self, n):
        self.pending += n

    def done(self):
        self.pending -= 1
        if self.pending == 0:
            self.acked.append(self.item)


def test_a_list_source_is_an_acking_source():
    """The documented example satisfies the AckingSource protocol."""
    assert isinstance(ListSource([]), AckingSource)
    assert not isinstance([1, 2], AckingSource)


async def test_every_item_is_acked_once_after_it_leaves(autojump_clock):
    """Items acked once done: flat-mapped children first (acked when the last child
    leaves), filtered items too; the source is told how much the run can hold."""

    @stage(workers=3)
    async def spread(x):
        await trio.sleep(0.1 * (x % 4))
        for i in range(x % 3):
            yield (x, i)

    source = ListSource(list(range(30)))
    result = await Pipeline(spread).arun(source)
    assert sorted(source.acked) == list(range(30))
    assert source.capacity is not None
    assert source.capacity > 0
    assert 30 == result.stats["spread"].items_in


async def test_a_fail_fast_stop_acks_only_what_finished(autojump_clock):
    """After a fail-fast failure the failed item and the unfinished ones are not acked
    (the source delivers them again); what left the pipeline is."""

    @stage(workers=2)
    async def picky(x):
        await trio.sleep(1)
        if x == 5:
            raise ValueError(x)
        return x

    source = ListSource(list(range(20)))
    with pytest.raises(StageError) as info:
        await Pipeline(picky).arun(source)
    result = info.value.result
    unfinished = {item for _, item in result.unfinished}
    assert 5 not in source.acked
    assert not unfinished & set(source.acked)
    assert set(source.acked) == set(result.outputs)


class PagedSource:
    """An acking source that reads pages: it hands them over with ``__pipeflow_take__``
    (as pipeflow.abc describes) and records the limits the run asks for."""

    def __init__(self, items):
        self.items = list(items)
        self.acked = []
        self.limits = []
        self.capacity = None

    @contextlib.asynccontextmanager
    async def __pipeflow_open__(self, *, capacity):
        self.capacity = capacity
        yield Pages(self)


class Pages:
    def __init__(self, source):
        self.source = source
        self.next = 0

    def __aiter__(self):
        return self

    async def __anext__(self):  # pragma: no cover - the run takes chunks
        raise StopAsyncIteration

    async def __pipeflow_take__(self, limit):
        await trio.lowlevel.checkpoint()
        s = self.source
        s.limits.append(limit)
        page = s.items[self.next : self.next + limit]
        self.next += len(page)
        return [(x, ItemAck(s.acked, x)) for x in page]


@pytest.mark.parametrize(("buffer", "room"), [(None, 64), (4, 4)])
async def test_a_paged_source_hands_over_a_page_at_a_time(autojump_clock, buffer, room):
    """The first stage after an acking source holds 64 items unless buffer= says
    otherwise (a slot per worker would take a page in bits): the source is asked for up
    to that many (and the workers waiting) at once, and told that the run holds them."""

    @stage(workers=2, buffer=buffer)
    async def slow(x):
        await trio.sleep(0.01)
        return x

    source = PagedSource(range(300))
    result = await Pipeline(slow).arun(source)
    assert sorted(result.outputs) == list(range(300))
    assert sorted(source.acked) == list(range(300))
    assert room <= max(source.limits) <= room + 2
    assert source.capacity == 2 + room


@pytest.mark.parametrize(("buffer", "room"), [(None, 64), (4, 4), (100, 100)])
async def test_a_run_report_shows_the_buffer_the_run_gave_the_first_stage(
    autojump_clock, buffer, room
):
    """The structure a run report or the dashboard shows (describe_pipeline, given the
    source) has the first stage's buffer the run used behind an acking source (it said
    8, a slot per worker, where the run held 64); the run holds exactly that much."""

    @stage(workers=8, buffer=buffer)
    async def slow(x):
        await trio.sleep(0.01)
        return x

    @stage(workers=2)
    async def after(x):
        return x

    pipeline = Pipeline(slow | after)
    source = PagedSource(range(200))
    described = describe_pipeline(pipeline, source=source)["stages"]
    assert [s["buffer"] for s in described] == [room, 2]
    await pipeline.arun(source)
    assert source.capacity == 8 + room + 2 + 2  # workers and buffers of both stages
    # Without an acking source (a list), the first stage keeps a slot per worker.
    assert describe_pipeline(pipeline, source=[1])["stages"][0]["buffer"] == (buffer or 8)
    assert describe_pipeline(pipeline)["stages"][0]["buffer"] == (buffer or 8)


async def test_an_embedded_failure_is_acked_once_it_is_read_and_dead_lettered(autojump_clock):
    """errors="embed" with a dead-letter stage: the failed item goes on to the reader
    as a Failed value and to the dead-letter stage. Its ack waits for both: read and
    dead-lettered, it is acked once; a reader that stops right after reading it, before
    the (slow) dead-letter stage has it, leaves it unacked and listed as unfinished there,
    so the source delivers it again."""
    dead = []

    @stage(name="letters")
    async def letters(failed):
        await trio.sleep(1)  # a slow store
        dead.append(failed.item)

    @stage(errors="embed", dead_letter=letters)
    async def check(x):
        if x == 1:
            raise ValueError(x)
        return x

    source = ListSource(range(6))
    await Pipeline(check).arun(source)
    assert dead == [1]
    assert sorted(source.acked) == list(range(6))

    dead.clear()
    source = ListSource(range(6))
    async with Pipeline(check).stream(source) as outputs:
        async for out in outputs:
            if isinstance(out, Failed):
                break
    assert dead == []
    assert 1 not in source.acked
    assert ("letters", 1) in [(name, f.item) for name, f in outputs.result.unfinished]
