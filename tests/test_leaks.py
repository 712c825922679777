"""Structured concurrency: no task or thread of a pipeline outlives its run, and
per-worker resources are closed on every exit path."""

from __future__ import annotations

import contextlib
import threading

import pytest
import trio

from pipeflow import Pipeline, StageError, stage
from pipeflow.testing import assert_nothing_left_running, running_tasks, running_threads


def make_pipeline(opened, closed, *, fail_on=None, block=None):
    @contextlib.asynccontextmanager
    async def connection():
        opened.append(1)
        try:
            yield "conn"
        finally:
            closed.append(1)

    @stage(workers=3, resource=connection)
    async def use(x, conn):
        assert conn == "conn"
        if x == fail_on:
            raise ValueError(x)
        await trio.sleep(0.01)
        return x

    @stage(workers=2)
    def in_thread(x):
        if block is not None:
            block.wait(5)
        return x

    return Pipeline(use | in_thread)


async def test_normal_end_leaves_nothing_running():
    """After a normal end: no task, no thread; each worker opened and closed once."""
    opened, closed = [], []
    result = await make_pipeline(opened, closed).arun(range(50))
    assert 50 == len(result.outputs)
    assert_nothing_left_running()
    assert [1, 1, 1] == opened == closed


async def test_fail_fast_leaves_nothing_running():
    """After a fail-fast error: same guarantees."""
    opened, closed = [], []
    with pytest.raises(StageError):
        await make_pipeline(opened, closed, fail_on=20).arun(range(50))
    assert_nothing_left_running()
    assert len(opened) == len(closed) == 3


async def test_outer_cancellation_waits_for_threads_and_leaves_nothing():
    """Cancelled while a thread runs: the run waits for it, then nothing is left."""
    opened, closed = [], []
    release = threading.Event()
    pipeline = make_pipeline(opened, closed, block=release)
    # The threads' work ends at 0.5 s. Started first: if a loaded machine let the
    # sleep below overrun the cancellation at 0.2 s, a timer started after it would
    # never start, and the threads (and the test) would wait forever.
    timer = threading.Timer(0.5, release.set)
    start = trio.current_time()
    timer.start()
    try:
        with trio.move_on_after(0.2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeline.arun, range(50))
                await trio.sleep(0.1)
                assert running_threads() != []
    finally:
        release.set()  # however the block ended, no thread is left waiting
    # A thread cannot be interrupted: the cancelled run waited for it to return.
    assert trio.current_time() - start >= 0.5
    timer.join()
    assert_nothing_left_running()
    assert len(opened) == len(closed) == 3


async def test_early_exit_from_stream_leaves_nothing_running():
    """Leaving stream() after a few outputs stops everything."""
    opened, closed = [], []
    async with make_pipeline(opened, closed).stream(range(10**6)) as outputs:
        async for out in outputs:
            if out == 5:
                break
        assert running_tasks() != []
    assert_nothing_left_running()
    assert len(opened) == len(closed) == 3
