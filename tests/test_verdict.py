"""The verdict names what limits a pipeline's rate, with its figure, from the steady
state of a run; each case is a real run under ``autojump_clock`` (or the real clock for
CPU time), judged as ``pipeflow graph report.json`` judges it."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import trio
import trio.testing

from pipeflow import Pipeline, stage
from pipeflow._report import Series, build_report, describe_pipeline, view_from_report
from pipeflow._report.text import render_text


async def report_of(pipeline: Pipeline[Any, Any], source: Any, **kw: Any) -> dict[str, Any]:
    """Run ``pipeline`` as ``pipeflow run`` does: a sample every second, then the report."""
    series = Series()
    t0 = trio.current_time()

    async def sample() -> None:
        k = 0
        while True:
            k += 1
            await trio.sleep_until(t0 + k)
            stats = pipeline.current_stats()
            if stats is not None:
                series.sample(trio.current_time() - t0, stats)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        result = await pipeline.arun(source, **kw)
        nursery.cancel_scope.cancel()
    series.sample(result.elapsed, result.stats)  # the final figures replace a last sample
    return build_report(
        target="test",
        status="completed",
        result=result.to_dict(),
        structure=describe_pipeline(pipeline),
        series=series,
    )


def verdict_of(report: dict[str, Any]) -> tuple[Any, str]:
    view = view_from_report(report, "r.json")
    return view.verdict, render_text(view)


async def test_a_batch_stage_is_sized_by_calls_not_items(autojump_clock):
    """1 worker writing batches of 100 in 1 s: 100 items/s, 1 worker busy. Its verdict
    says 1 busy worker (not 100) and sizes it in single digits; it states that it
    assumes batches stay as full."""

    @stage(batch=100)
    async def write(rows):
        await trio.sleep(1.0)
        return len(rows)

    report = await report_of(Pipeline(write, name="w"), range(2000))
    verdict, _ = verdict_of(report)
    assert "stage" == verdict.kind
    assert "write" == verdict.stage
    assert "= 1.00 of 1 worker busy on average" in verdict.headline
    assert "3 workers for write" in verdict.text()  # twice the rate at 70%
    assert "write's batches stay as full as measured (100 items per call of 1 s)" in verdict.text()


async def test_a_rate_limit_is_named_with_its_figure(autojump_clock):
    """A stage behind rate=10 is mostly waiting for tokens: the rate limit is named,
    with its setting and the time waited, and no stage is called the bottleneck."""

    @stage(workers=8, rate=10)
    async def call(x):
        await trio.sleep(0.01)
        return x

    report = await report_of(Pipeline(call, name="r"), range(100))
    verdict, text = verdict_of(report)
    assert "rate_limit" == verdict.kind
    assert verdict.headline.startswith("The rate limit of call (rate=10/s) limits the rate")
    assert "waited" in verdict.headline
    assert "◀ its rate limit limits the rate" in text
    assert "throttled " in text
    assert report["bottleneck"] is None


async def test_a_slow_source_is_named(autojump_clock):
    """Items arrive every 0.1 s and take 10 ms: the source limits the rate."""

    async def slowly():
        for i in range(50):
            await trio.sleep(0.1)
            yield i

    @stage
    async def work(x):
        await trio.sleep(0.01)
        return x

    verdict, _ = verdict_of(await report_of(Pipeline(work, name="s"), slowly()))
    assert "source" == verdict.kind
    assert verdict.headline.startswith("The source limits the rate")
    assert "no stage is 80% busy (busiest: work, 10% busy)" in verdict.headline


async def test_an_outage_does_not_hide_a_saturated_stage(autojump_clock):
    """A stage 100% busy except for a 4 s pause of its source reads about 70% over the
    whole run; the verdict judges the steady state, names it, and gives the whole-run
    figure beside."""

    async def with_outage():
        for i in range(100):
            if i == 50:
                await trio.sleep(4.0)
            yield i

    @stage(workers=2)
    async def work(x):
        await trio.sleep(0.2)
        return x

    report = await report_of(Pipeline(work, name="o"), with_outage())
    whole = report["stages"][0]["utilisation"]
    assert whole < 0.8
    verdict, _ = verdict_of(report)
    assert "stage" == verdict.kind
    assert "work" == verdict.stage
    assert "steady state" in verdict.window
    assert "of outages left out" in verdict.window
    assert f"({whole:.0%} over the whole run)" in verdict.headline


async def test_co_bottlenecks_are_all_named(autojump_clock):
    """Two stages at the same capacity: both are at the limit, and the advice sizes
    both."""

    @stage(workers=2)
    async def a(x):
        await trio.sleep(0.2)
        return x

    @stage(workers=2)
    async def b(x):
        await trio.sleep(0.2)
        return x

    verdict, text = verdict_of(await report_of(Pipeline(a | b, name="c"), range(200)))
    assert "stage" == verdict.kind
    assert {"a", "b"} == set(verdict.limits)
    assert "Also at the limit:" in verdict.headline
    assert "for a" in verdict.text()
    assert "for b" in verdict.text()
    assert text.count("◀ limits the rate") == 2


async def test_a_stage_sized_as_advised_is_not_named(autojump_clock):
    """Sizing aims at 70%, naming starts at 80%: a stage 70% busy is not a bottleneck."""

    async def paced():
        for i in range(100):
            await trio.sleep(0.1)
            yield i

    @stage(workers=1)
    async def work(x):
        await trio.sleep(0.07)
        return x

    report = await report_of(Pipeline(work, name="p"), paced())
    verdict, _ = verdict_of(report)
    assert "source" == verdict.kind
    assert report["bottleneck"] is None


def test_a_cpu_bound_thread_stage_is_told_that_threads_will_not_help():
    """Pure-Python work in a plain-function stage: its CPU time is measured in its
    threads, and the verdict says the GIL limits it and what to do instead."""

    @stage(workers=4)
    def spin(x):
        end = time.thread_time() + 0.004
        while time.thread_time() < end:
            pass
        return x

    async def go() -> dict[str, Any]:
        return await report_of(Pipeline(spin, name="cpu"), range(200))

    report = trio.run(go)
    s = report["stages"][0]
    assert 0.75 < s["cpu_seconds"] < 1.5  # 200 calls x 4 ms of CPU, measured in threads
    # On a busy shared machine the run's elapsed time says little; judge the figures an
    # idle machine gives: the four threads took turns on one core, all the time.
    elapsed = s["cpu_seconds"] * 1.05
    s |= {"busy_seconds": 4 * elapsed, "mean_workers": 4.0, "utilisation": 1.0}
    s |= {"throughput": 200 / elapsed, "blocked_seconds": 0.0, "throttled_seconds": 0.0}
    report |= {"elapsed": elapsed, "series": None}
    verdict, text = verdict_of(report)
    assert "spin" == verdict.stage
    assert "spin is CPU-bound: its threads ran Python on 0.95 CPU cores" in verdict.text()
    assert "more threads will not help" in verdict.text()
    assert 'run_in="process"' in verdict.text()
    assert "CPU 24% of busy time" in text


async def test_the_html_page_shows_the_verdict_and_throttled_time(autojump_clock):
    """The HTML page of a rate-limited run says what limits it and shows throttled time."""
    from pipeflow._report import render_html

    @stage(workers=8, rate=10)
    async def call(x):
        return x

    view = view_from_report(await report_of(Pipeline(call, name="r"), range(50)), "r.json")
    page = render_html(view)
    assert 'class="advice verdict" data-kind="rate_limit" data-stage="call"' in page
    assert "The rate limit of call (rate=10/s) limits the rate" in page
    assert "<th>throttled</th>" in page


def test_graph_compares_a_run_with_the_run_it_was_advised_from(tmp_path, capsys):
    """Advised 6 workers for a 2-worker stage, the second run has them: the comparison
    says the advice was followed and how close the rate came to the prediction."""
    from pipeflow._cli import main

    @stage(workers=8)
    async def fetch(x):
        await trio.sleep(0.05)
        return x

    def parse_with(n: int) -> Any:
        @stage(workers=n, name="parse")
        async def parse(x):
            await trio.sleep(0.25)
            return x

        return parse

    async def both() -> None:
        before = await report_of(Pipeline(fetch | parse_with(2), name="c"), range(80))
        (tmp_path / "before.json").write_text(json.dumps(before))
        sizes = view_from_report(before, "b").verdict.sizes
        after = await report_of(Pipeline(fetch | parse_with(sizes["parse"]), name="c"), range(240))
        (tmp_path / "after.json").write_text(json.dumps(after))

    trio.run(both, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 0 == main(["graph", str(tmp_path / "before.json"), str(tmp_path / "after.json")])
    out = capsys.readouterr().out
    assert "  parse  2 → 6 " in out
    assert re.search(
        r"advice followed \(6 workers for parse\): predicted [\d.]+/s, measured [\d.]+/s \([+-]\d+%: as predicted\)",
        out,
    )
    assert 2 == main(["graph", str(tmp_path / "before.json"), "http://127.0.0.1:1/metrics"])
    assert "comparing needs two run reports" in capsys.readouterr().err


def test_the_live_view_does_not_count_throttled_waits_as_busy():
    """16 workers waiting for rate tokens (the busy gauge says 16): the lines view shows
    the busy time over the last seconds, about 0.2 workers, and the throttled ones apart;
    it counts items done, not batches."""
    import io

    from pipeflow._cli.progress import Progress
    from pipeflow._stats import StageCounters

    out = io.StringIO()
    progress = Progress(out, mode="lines", title="t")
    c = StageCounters("call")
    c.workers = c.busy_workers = 16  # all of them inside the call, waiting for a token
    c.worker_time = -16 * 0.0
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        c.busy_time += 0.2  # 20 items of 10 ms a second
        c.throttled_time += 15.8
        c.ok += 20
        c.items_out += 1  # a batch stage: one output per 20 items
        progress.update(t, {"call": c.snapshot(t, t)}, Series())
    line = out.getvalue().strip()
    assert "100 done" in line
    assert "call 0.2/16 busy" in line
