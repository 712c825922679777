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

from pipeflow import Pipeline, stage
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
