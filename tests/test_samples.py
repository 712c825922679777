"""Pipeline.samples(): what exporters read (the Prometheus metrics are made from it)."""

from __future__ import annotations

import trio

from pipeflow import Pipeline, StageSample, stage


async def test_samples_add_finished_runs_and_show_the_run_in_progress(autojump_clock):
    """Counts only go up across runs; gauges show the run in progress, and the
    histograms count every item once."""

    @stage(workers=2, errors="skip")
    async def work(x):
        await trio.sleep(1)
        if x == 3:
            raise ValueError(x)
        return x

    pipeline = Pipeline(work)
    assert StageSample(name="work") == pipeline.samples()["work"]
    await pipeline.arun(range(5))
    await pipeline.arun(range(5))
    done = pipeline.samples()["work"]
    assert (8, 2) == (done.ok, done.failed)
    assert 10 == sum(done.duration_counts)
    assert 10.0 == done.duration_sum
    assert (0, 0, None) == (done.busy_workers, done.inflight, done.stall_after_seconds)

    async with pipeline.open() as flow:
        for i in range(4):
            await flow.send(i)
        await trio.sleep(0.5)
        live = pipeline.samples()["work"]
        assert (2, 2, 2) == (live.workers, live.busy_workers, live.inflight)
        assert 2 == live.queue_depth
        assert 0.5 == live.oldest_inflight_seconds
        assert live.stall_after_seconds is not None
        assert (8, 2) == (live.ok, live.failed)
    after = pipeline.samples()["work"]
    assert (11, 3) == (after.ok, after.failed)


async def test_every_duration_is_in_the_histograms_whenever_they_are_read(autojump_clock):
    """A reader sees every duration and queue wait the workers recorded, in the middle
    of a run and after it, summed in the order they came."""

    @stage(workers=1)
    async def timed(x):
        await trio.sleep(0.25 if x % 2 else 0.5)
        return x

    pipeline = Pipeline(timed)
    n = 301
    async with pipeline.open(outputs=True) as flow:
        for i in range(n):
            await flow.send(i)
            assert i == await flow.outputs.receive()
            live = pipeline.samples()["timed"]
            assert (i + 1, i + 1) == (sum(live.duration_counts), sum(live.wait_counts))
        stats = pipeline.current_stats()
        assert stats is not None
        assert 0.5 == stats["timed"].duration_max
    done = pipeline.samples()["timed"]
    one_by_one = 0.0
    for i in range(n):
        one_by_one += 0.25 if i % 2 else 0.5
    assert (n, one_by_one, 0.0) == (sum(done.duration_counts), done.duration_sum, done.wait_sum)
    assert one_by_one / n == flow.result.stats["timed"].duration_mean
