"""Today's runner changes as a hostile user drives them: chunks of ``async def`` items run
by one driver (items that wait give the rest back), ordered stages in a row restoring
the order once, the edge's end seen by every parked receiver, and the signal gate held
around the whole run. Each test names what it guards; each bug found this way has a test
that failed before its fix."""

from __future__ import annotations

import itertools
import random

import pytest
import trio

from pipeflow import Pipeline, PipelineFull, stage
from pipeflow.testing import assert_nothing_left_running


def assert_balanced(result, pipeline=None):
    """Conservation in every stage, nothing in flight, ``unfinished`` matching the
    ``cancelled`` counts; with ``pipeline``, what each stage handed on is what the next
    one counted in."""
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
    for a, b in itertools.pairwise(pipeline.stages):
        sa, sb = result.stats[a.name], result.stats[b.name]
        embedded = sa.failed if a.options.errors == "embed" else 0
        assert sa.items_out + sa.passed + embedded == sb.items_in + sb.passed, (sa, sb)


# -- order once ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
async def test_ordered_pair_keeps_order_when_the_quick_last_stage_takes_a_shuffled_chunk(
    seed, autojump_clock
):
    """Two ordered stages share one window: items of the first (4 workers, 1 or 2 s each)
    finish together and reach the second in any order; the second (instant, so it takes
    what waits as one chunk) may take a chunk that starts at the head of the line but is
    shuffled inside. The outputs still come in input order, and the run ends."""
    rng = random.Random(seed)
    n = 300
    delays = [rng.choice([1, 1, 1, 2]) for _ in range(n)]

    @stage(workers=4, ordered=True)
    async def slow(x):
        await trio.sleep(delays[x])
        return x

    @stage(workers=2, ordered=True)
    async def quick(x):
        return x

    pipeline = Pipeline(slow | quick)
    with trio.fail_after(1000):  # about 95 s of mock time when it works
        result = await pipeline.arun(range(n))
    assert list(range(n)) == result.outputs
    assert_balanced(result, pipeline)
    assert_nothing_left_running()


def _ordered_group(
    rng, *, errors="skip", fail=lambda name, x: False, dead=None, first_workers=None
):
    """2-3 ordered plain-map ``async def`` stages (every one after the first with more
    than one worker, so they share one window), items instant or waiting a little."""
    stages = []
    for i in range(rng.randint(2, 3)):
        name = f"g{i}"
        workers = rng.choice([2, 3, 4, 8])
        if i == 0 and first_workers is not None:
            workers = first_workers
        options = {"name": name, "workers": workers, "ordered": True, "errors": errors}
        options["buffer"] = rng.choice([0, 1, 4, 16])
        if dead is not None:
            options["dead_letter"] = dead.append
        waits = {x: rng.choice([0, 0, 0, 0.001, 0.01]) for x in range(2000)}

        @stage(**options)
        async def work(x, name=name, waits=waits):
            if waits[x]:
                await trio.sleep(waits[x])
            if fail(name, x):
                raise ValueError(f"{name} fails on {x}")
            return x

        stages.append(work)
    chain = stages[0]
    for st in stages[1:]:
        chain = chain | st
    return chain


@pytest.mark.parametrize("errors", ["skip", "collect", "embed"])
@pytest.mark.parametrize("seed", range(3))
async def test_every_item_failing_in_the_first_stage_of_an_ordered_group(
    errors, seed, autojump_clock
):
    """Every item fails in the first stage of a run of ordered stages: each is a hole the
    last stage is told of (skip, collect) or a Failed value that passes the others
    (embed). The run ends, every failure reaches the dead-letter sink, embed's Failed
    values come out in input order, and the counts balance."""
    rng = random.Random(seed)
    dead = []
    chain = _ordered_group(rng, errors=errors, fail=lambda name, x: name == "g0", dead=dead)
    pipeline = Pipeline(chain)
    n = 500
    with trio.fail_after(1000):
        result = await pipeline.arun(range(n))
    assert list(range(n)) == sorted(f.item for f in dead)
    if errors == "embed":
        assert list(range(n)) == [o.item for o in result.outputs]
    else:
        assert [] == result.outputs
    if errors == "collect":
        assert n == len(result.errors)
    assert_balanced(result, pipeline)


@pytest.mark.parametrize("seed", range(4))
async def test_an_ordered_group_feeding_a_one_worker_ordered_stage_hands_it_input_order(
    seed, autojump_clock
):
    """Ordered stages with several workers, then an ordered stage with one worker (which
    writes a file in order, say): that stage is called in input order, and the outputs
    come out in input order, with failures (skip) here and there."""
    rng = random.Random(seed)
    calls = []

    def fail(name, x):
        return x % 17 == 3 and name == "g1"

    @stage(workers=1, ordered=True)
    async def write(x):
        calls.append(x)
        if x % 5 == 0:
            await trio.sleep(0.001)
        return x

    pipeline = Pipeline(_ordered_group(rng, errors="skip", fail=fail) | write)
    n = 600
    with trio.fail_after(1000):
        result = await pipeline.arun(range(n))
    expected = [x for x in range(n) if x % 17 != 3 or len(pipeline.stages) < 3]
    assert expected == calls
    assert expected == result.outputs
    assert_balanced(result, pipeline)


@pytest.mark.parametrize("seed", range(12))
async def test_an_ordered_group_into_a_slow_reader_of_a_rendezvous_outlet(seed, autojump_clock):
    """A run of ordered stages whose outputs go straight to a ``stream(buffer=0)`` reader
    that takes its time: what the reader sees is input order, and leaving early or an
    outer cancellation at a random moment ends the run with every stage balanced and
    nothing left running."""
    rng = random.Random(seed)
    pipeline = Pipeline(_ordered_group(rng))
    leave = rng.choice([None, rng.randint(0, 300)])
    seen = []
    outputs = None
    with trio.fail_after(1000), trio.move_on_after(rng.choice([1000, rng.random() * 2])):
        async with pipeline.stream(range(400), buffer=0) as outputs:
            async for out in outputs:
                seen.append(out)
                await trio.sleep(rng.choice([0, 0.001, 0.01]))
                if leave is not None and len(seen) >= leave:
                    break
    assert seen == list(range(len(seen)))
    assert_balanced(outputs.result, pipeline)
    assert_nothing_left_running()


@pytest.mark.parametrize("seed", range(12))
async def test_floods_of_send_nowait_into_an_ordered_group(seed, autojump_clock):
    """open(outputs=True) fed by bursts of send_nowait (PipelineFull when the first stage
    is full, then a blocking send): every accepted item comes out once, in the order it
    was accepted, and the counts balance; a random outer cancellation loses nothing
    either (what did not come out is unfinished)."""
    rng = random.Random(seed)
    pipeline = Pipeline(_ordered_group(rng, first_workers=rng.choice([1, 4])))
    accepted, seen = [], []
    full = 0
    flow = None
    cancel = rng.random() < 0.5
    with trio.fail_after(1000), trio.move_on_after(rng.random() if cancel else 1000):
        async with trio.open_nursery() as nursery, pipeline.open(outputs=True) as flow:

            async def read():
                async for out in flow.outputs:
                    seen.append(out)

            nursery.start_soon(read)
            x = 0
            for _ in range(30):
                for _ in range(rng.randint(1, 80)):
                    try:
                        flow.send_nowait(x)
                    except PipelineFull:
                        full += 1
                        await flow.send(x)
                    accepted.append(x)
                    x += 1
                await trio.sleep(rng.choice([0, 0.001, 0.05]))
    result = flow.result
    assert seen == accepted[: len(seen)]
    if not cancel:
        assert seen == accepted
        assert full > 0
    unfinished = sorted(x for _, x in result.unfinished)
    assert set(unfinished).isdisjoint(seen)
    assert_balanced(result, pipeline)
    assert_nothing_left_running()
