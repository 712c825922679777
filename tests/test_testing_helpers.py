"""pipeflow.testing: helpers for users' own pipeline tests."""

from __future__ import annotations

import trio

from pipeflow import Pipeline, stage
from pipeflow.testing import FailureRecorder, collect, run_on_mock_clock


@stage(workers=2)
async def slow_double(x):
    await trio.sleep(1)
    return 2 * x


def test_run_on_mock_clock_gives_exact_times_instantly():
    """Four 1 s items on two workers take exactly 2 s of mock time."""
    result = run_on_mock_clock(Pipeline(slow_double), range(4))
    assert [0, 2, 4, 6] == sorted(result.outputs)
    assert 2.0 == result.elapsed


def test_failure_recorder_keeps_every_failed_item():
    """As a dead-letter sink it records items, errors and stages."""

    @stage(errors="skip")
    async def picky(x):
        if x % 3 == 0:
            raise ValueError(x)
        return x

    failures = FailureRecorder()
    result = Pipeline(picky, dead_letter=failures).run(range(7))
    assert [1, 2, 4, 5] == sorted(result.outputs)
    assert [0, 3, 6] == sorted(failures.items)
    assert {"picky": sorted(failures.items)} == {
        k: sorted(v) for k, v in failures.by_stage().items()
    }
    assert all(isinstance(f.error, ValueError) for f in failures.failures)


async def test_collect_reads_a_stream_to_the_end(autojump_clock):
    """collect() drains stream() outputs into a list."""
    async with Pipeline(slow_double).stream(range(3)) as outputs:
        got = await collect(outputs)
    assert [0, 2, 4] == sorted(got)
