"""Combinations of runner features against the semantics users rely on
(docs/design.md): dead letters with batches, ordered flows, acking sources, budgets.

Each test below first showed a real bug (as a strict xfail) and now guards its fix;
the others pin down combinations that turned out right and were not covered elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from pipeflow import Failed, Pipeline, StageError, stage


class AckingSource:
    """A minimal acking source (the ``__pipeflow_open__`` protocol), like Redis Streams:
    it keeps at most ``capacity`` un-acked items and ends once every item is acked."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.outstanding = 0
        self.acked: list[int] = []
        self._acked_one = trio.Event()

    async def _wait_until_fewer_than(self, limit: int) -> None:
        while self.outstanding >= limit:
            self._acked_one = trio.Event()
            await self._acked_one.wait()

    @contextlib.asynccontextmanager
    async def __pipeflow_open__(self, *, capacity: int) -> AsyncIterator[Any]:
        source = self

        class Ack:
            def __init__(self, i: int) -> None:
                self.i = i
                self.pending = 1

            def add(self, n: int) -> None:
                self.pending += n

            def done(self) -> None:
                self.pending -= 1
                assert self.pending >= 0, f"item {self.i} acked twice"
                if self.pending == 0:
                    source.acked.append(self.i)
                    source.outstanding -= 1
                    source._acked_one.set()

        async def entries() -> AsyncIterator[tuple[int, Ack]]:
            for i in range(self.n):
                await self._wait_until_fewer_than(capacity)
                self.outstanding += 1
                yield i, Ack(i)
            await self._wait_until_fewer_than(1)

        yield entries()


# -- bugs --------------------------------------------------------------------------------


async def test_batched_dead_letter_stage_gets_lists_of_failed_items(autojump_clock):
    """A dead-letter stage with batch= receives lists of Failed values, like any batch."""
    batches: list[list[Failed[int]]] = []

    @stage(name="store_failures", batch=3)
    async def store_failures(failed: list[Failed[int]]) -> None:
        batches.append(failed)

    @stage(errors="collect", dead_letter=store_failures)
    async def boom(x: int) -> int:
        raise ValueError(x)

    with trio.fail_after(10):
        result = await Pipeline(boom).arun(range(5))
    assert 5 == len(result.errors)
    assert [[0, 1, 2], [3, 4]] == [[f.item for f in b] for b in batches]


async def test_cancelled_flow_send_does_not_stall_an_ordered_stage(autojump_clock):
    """A send given up on (a timeout on backpressure) leaves later items unharmed."""

    @stage(workers=1, buffer=1, ordered=True)
    async def slow(x: int) -> int:
        await trio.sleep(1)
        return x

    got: list[int] = []
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery, Pipeline(slow).open(outputs=True) as flow:

            async def read() -> None:
                assert flow.outputs is not None
                async for out in flow.outputs:
                    got.append(out)

            nursery.start_soon(read)
            await flow.send(0)  # taken by the worker
            await flow.send(1)  # waits in the buffer
            with trio.move_on_after(0.1):
                await flow.send(2)  # full: the caller gives up
            await flow.send(3)
    assert [0, 1, 3] == got


async def test_acking_source_with_two_batch_stages_in_a_row_finishes(autojump_clock):
    """An acking source feeding batch=10 | batch=10 gets every item acked."""

    @stage(batch=10)
    async def tens(xs: list[int]) -> int:
        return sum(xs)

    @stage(batch=10)
    async def hundreds(xs: list[int]) -> int:
        return sum(xs)

    source = AckingSource(200)
    with trio.fail_after(100):
        result = await Pipeline(tens | hundreds).arun(source)
    assert [sum(range(100)), sum(range(100, 200))] == result.outputs
    assert list(range(200)) == sorted(source.acked)


async def test_leaving_stream_early_does_not_wait_for_dead_letters(autojump_clock):
    """Leaving stream() early cancels every worker, dead-letter stage included."""

    @stage(name="dead_letters")
    async def dead_letters(failed: Failed[int]) -> None:
        await trio.sleep(60)

    @stage(errors="skip", dead_letter=dead_letters, buffer=0)
    async def work(x: int) -> int:
        if x % 2:
            raise ValueError(x)
        return x

    t0 = trio.current_time()
    with trio.fail_after(1000):
        async with Pipeline(work).stream(range(10)) as outputs:
            async for out in outputs:
                if out >= 4:
                    break
    assert trio.current_time() - t0 < 60


async def test_fail_fast_statistics_keep_conservation():
    """After a fail-fast stop, items_in = ok + filtered + failed + dropped + inflight."""

    @stage
    async def boom(x: int) -> int:
        raise ValueError(x)

    with pytest.raises(StageError) as caught:
        await Pipeline(boom).arun([1])
    s = caught.value.result.stats["boom"]
    assert (1, 1, 0) == (s.items_in, s.failed, s.inflight)
    assert s.items_in == s.ok + s.filtered + s.failed + s.dropped + s.inflight


async def test_resource_that_cannot_open_raises_its_error_not_a_group():
    """Every worker failing to open its resource surfaces that error, once."""

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[None]:
        raise ConnectionError("database down")
        yield  # pragma: no cover

    @stage(workers=4, resource=connection)
    async def use(x: int, conn: None) -> int:
        return x

    with pytest.raises(ConnectionError, match="database down"):
        await Pipeline(use).arun([1, 2])


async def test_resource_teardown_runs_to_the_end_on_cancellation(autojump_clock):
    """A resource's async teardown completes in every worker when the run is cancelled."""
    closed: list[int] = []

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            await trio.lowlevel.checkpoint()  # a graceful close (flush, goodbye)
            closed.append(1)

    @stage(workers=2, resource=connection)
    async def use(x: int, conn: int) -> int:
        if x == 3:
            raise ValueError(x)
        await trio.sleep(1)
        return x

    with pytest.raises(StageError):
        await Pipeline(use).arun(range(5))
    assert [1, 1] == closed


async def test_stream_buffer_does_not_ack_outputs_nobody_read(autojump_clock):
    """With stream(buffer=N), only outputs the reader received are acked."""

    @stage
    async def double(x: int) -> int:
        return 2 * x

    source = AckingSource(20)
    read: list[int] = []
    with trio.fail_after(10):
        async with Pipeline(double).stream(source, buffer=5) as outputs:
            async for out in outputs:
                read.append(out // 2)
                await trio.sleep(1)
                if len(read) == 2:
                    break
    assert sorted(read) == sorted(source.acked)


# -- combinations that hold ---------------------------------------------------------------


async def test_ordered_embed_flat_map_keeps_input_order(autojump_clock):
    """Failures embedded upstream and in an ordered flat-map stage leave in input order,
    with each stage's counts conserved."""

    @stage(workers=3, ordered=True, errors="embed")
    async def first(x: int) -> int:
        await trio.sleep((7 * x) % 5)
        if x % 4 == 1:
            raise ValueError(x)
        return x

    @stage(workers=3, ordered=True, errors="embed")
    async def fan(x: int) -> AsyncIterator[tuple[int, int]]:
        await trio.sleep((3 * x) % 4)
        if x % 4 == 2:
            raise KeyError(x)
        for i in range(x % 3):
            yield (x, i)

    with trio.fail_after(100):
        result = await Pipeline(first | fan).arun(range(12))
    seen = [(o.stage, o.item) if isinstance(o, Failed) else o for o in result.outputs]
    expected: list[Any] = []
    for x in range(12):
        if x % 4 == 1:
            expected.append(("first", x))
        elif x % 4 == 2:
            expected.append(("fan", x))
        else:
            expected.extend((x, i) for i in range(x % 3))
    assert expected == seen
    for s in result.stats.values():
        assert s.items_in == s.ok + s.filtered + s.failed + s.dropped + s.inflight
    assert (9, 3) == (result.stats["fan"].items_in, result.stats["fan"].passed)


async def test_key_function_failures_keep_order_and_counts(autojump_clock):
    """key= + ordered=True: an item whose key function raises fails by policy, in place,
    and the other items still leave in input order."""

    def key(x: int) -> int:
        if x % 5 == 3:
            raise ValueError(x)
        return x % 2

    @stage(workers=3, ordered=True, key=key, errors="embed")
    async def work(x: int) -> int:
        await trio.sleep((7 * x) % 3)
        return x

    with trio.fail_after(100):
        result = await Pipeline(work).arun(range(15))
    seen = [("failed", o.item) if isinstance(o, Failed) else o for o in result.outputs]
    assert [("failed", x) if x % 5 == 3 else x for x in range(15)] == seen
    s = result.stats["work"]
    assert (15, 12, 3, 0) == (s.items_in, s.ok, s.failed, s.inflight)


async def test_batch_dead_letter_stage_and_collect_ack_every_item_once(autojump_clock):
    """A failing batch under collect goes to a dead-letter stage as one Failed list; every
    source item is acked exactly once (the source asserts no double ack)."""
    dead: list[list[int]] = []

    @stage(name="dead")
    async def dead_stage(failed: Failed[list[int]]) -> None:
        await trio.sleep(1)
        dead.append(failed.item)

    @stage(batch=4, batch_timeout=1, errors="collect", dead_letter=dead_stage)
    async def store(rows: list[int]) -> int:
        if 5 in rows:
            raise ValueError("bad row")
        return len(rows)

    source = AckingSource(10)
    with trio.fail_after(100):
        result = await Pipeline(store).arun(source)
    assert [[4, 5, 6, 7]] == dead
    assert [4, 2] == result.outputs
    assert list(range(10)) == sorted(source.acked)


async def test_source_error_with_a_batch_pending_surfaces_as_itself(autojump_clock):
    """A source that raises while a partial batch waits stops the run with its own error."""

    async def source() -> AsyncIterator[int]:
        yield 1
        yield 2
        await trio.sleep(0.5)
        raise OSError("disk gone")

    @stage(batch=5, batch_timeout=1)
    async def store(rows: list[int]) -> list[int]:
        return rows

    with trio.fail_after(10), pytest.raises(OSError, match="disk gone"):
        await Pipeline(store).arun(source())
