"""The runner in the shape users write: outputs read with ``async for`` from
``Pipeline.stream()``, against hand-written Trio and hand-written asyncio (stdlib only)
pipelines of the same shape, timed in alternating rounds of one process run.

Every hand-written pipeline is what a careful programmer writes by hand: a producer, one
channel (or ``asyncio.Queue``) per edge, N worker tasks per stage, and the reader in the
caller's task consuming the last edge and counting outputs. pipeflow is read with the
default ``stream()`` arguments (the shape a user gets), plus an info row with
``stream(..., buffer=16)``.

Workloads (ratios are pipeflow / baseline; single-threaded ones on CPU time,
``time.process_time()``). Each round runs every case once, the order flipped every
round, with each target's two sides next to each other; a ratio is the median of the
rounds' own ratios (the JSON also keeps the ratio of each side's median,
``ratio_of_medians``): on a shared machine whose speed drifts over seconds, runs next
to each other compare like with like.

- W1: 3 stages x 4 workers, ``async def f(x): return x``, buffer 16 on every stage,
  200,000 items; vs asyncio (target >= 1.0) and Trio.
- W4: W1 with every stage ``ordered=True``; the baselines reorder once, at the reader,
  under a window of 256 (target >= 1.0 vs asyncio).
- W2: 3 x 50 workers, each item sleeping 10 ms, 5,000 items, wall clock; vs Trio
  (target >= 1.0) and the Little's Law bound 50 / 10 ms = 5,000 items/s (>= 0.85);
  the CPU-time ratio to Trio is shown too (a loaded machine starves the wall clock),
  and Trio's own ceiling: the same 15,000 sleeps in 150 bare tasks, no pipeline.
- threads: 3 x 8 workers of a plain ``def f(x): return x`` (worker threads), 20,000
  items; vs Trio calling ``trio.to_thread.run_sync(f, x)`` per item (target >= 2.0 on
  wall-clock throughput; the CPU-time ratio is shown too).
- wide: 3 stages x 1,000 workers, identity ``async def``, 50,000 items, CPU time; vs
  Trio (target >= 1.0).
- latency: 3 x 4 identity stages, the source paced at 2,000 items/s, end-to-end latency
  (source emits -> reader has it) p50 and p99 vs Trio (target: no worse, ratio <= 1.0).

    python benchmarks/bench_stream.py [--quick] [--json FILE] [--check]
        [--only w1,w4,w2,threads,wide,latency] [--rounds N]
"""

from __future__ import annotations

import asyncio
import functools
import operator
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._common import (
    Row,
    bench_main,
    interleaved_clocks,
    median,
    paired_ratio,
    percentile,
    progress,
    rate_row,
)
from pipeflow import Pipeline, stage

STAGES = 3
BUFFER = 16
WINDOW = 256
READER_BUFFER = 16

Call = Callable[[Any], Awaitable[Any]]
Sink = Callable[[Any], None]


# -- the work ----------------------------------------------------------------------------------


async def identity(x: Any) -> Any:
    return x


def plain_identity(x: Any) -> Any:
    return x


LATENCY = 0.01


async def trio_io(x: Any) -> Any:
    await trio.sleep(LATENCY)
    return x


async def asyncio_io(x: Any) -> Any:
    await asyncio.sleep(LATENCY)
    return x


async def trio_sleepers(n: int, tasks: int) -> int:
    """W2 without a pipeline: Trio's own ceiling. ``tasks`` tasks sleep ``LATENCY`` in a
    loop, ``STAGES * n`` sleeps in all (W2's sleeps, with nothing handed over); returns
    ``n``, so that ``n / wall`` compares with W2's items/s."""

    async def sleeper(k: int) -> None:
        for _ in range(k):
            await trio.sleep(LATENCY)

    per_task, extra = divmod(STAGES * n, tasks)
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(sleeper, per_task + (i < extra))
    return n


def make_pipeline(
    fn: Callable[[Any], Any],
    *,
    workers: int,
    buffer: int | None = None,
    ordered: bool = False,
    name: str,
) -> Pipeline[Any, Any]:
    """``STAGES`` stages of ``fn``, each with ``workers`` workers (``buffer=None``: the
    default buffer, one slot per worker)."""
    parts = [
        stage(workers=workers, buffer=buffer, ordered=ordered, name=f"{name}_{i + 1}")(fn)
        for i in range(STAGES)
    ]
    return Pipeline(functools.reduce(operator.or_, parts), name=name)


# -- pipeflow, read as users read it -----------------------------------------------------------


async def pipeflow_stream(
    pipeline: Pipeline[Any, Any],
    source: Any,
    *,
    reader_buffer: int | None = None,
    sink: Sink | None = None,
) -> int:
    """``async with pipeline.stream(source) as outputs: async for out in outputs``,
    counting outputs (and handing each to ``sink`` if given). ``reader_buffer=None``:
    the default ``stream()`` arguments."""
    count = 0
    stream = (
        pipeline.stream(source)
        if reader_buffer is None
        else pipeline.stream(source, buffer=reader_buffer)
    )
    async with stream as outputs:
        if sink is None:
            async for _ in outputs:
                count += 1
        else:
            async for out in outputs:
                sink(out)
                count += 1
    return count


# -- hand-written Trio -------------------------------------------------------------------------


async def trio_stream(
    source: Iterable[Any] | AsyncIterator[Any],
    call: Call,
    *,
    stages: int = STAGES,
    workers: int,
    buffer: int,
    window: int | None = None,
    sink: Sink | None = None,
) -> int:
    """Hand-written Trio in the same shape: a producer task, one memory channel of
    ``buffer`` per edge (the last one read by the reader), ``workers`` tasks per stage
    each holding its own ``clone()`` of both channels, and the reader in the caller's
    task doing ``async for`` over the last channel, counting outputs.

    With ``window``, items carry their sequence number and the reader restores order
    once, at the end: the producer takes a semaphore of ``window`` per item and the
    reader releases it when it emits that item in order.
    """
    sem = trio.Semaphore(window) if window is not None else None

    async def producer(send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            if sem is None:
                if isinstance(source, AsyncIterator):
                    async for x in source:
                        await send.send(x)
                else:
                    for x in source:
                        await send.send(x)
            else:
                assert not isinstance(source, AsyncIterator)
                for seq, x in enumerate(source):
                    await sem.acquire()
                    await send.send((seq, x))

    async def worker(
        recv: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any]
    ) -> None:
        async with recv, send:
            async for x in recv:
                await send.send(await call(x))

    async def ordered_worker(
        recv: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any]
    ) -> None:
        async with recv, send:
            async for seq, x in recv:
                await send.send((seq, await call(x)))

    work = worker if sem is None else ordered_worker
    count = 0
    async with trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[Any](buffer)
        nursery.start_soon(producer, send)
        for _ in range(stages):
            next_send, next_recv = trio.open_memory_channel[Any](buffer)
            async with recv, next_send:
                for _ in range(workers):
                    nursery.start_soon(work, recv.clone(), next_send.clone())
            recv = next_recv
        async with recv:
            if sem is not None:
                pending: dict[int, Any] = {}
                expected = 0
                async for seq, y in recv:
                    if seq != expected:
                        pending[seq] = y
                        continue
                    while True:  # emit y, then whatever it was holding up
                        if sink is not None:
                            sink(y)
                        count += 1
                        sem.release()
                        expected += 1
                        if expected not in pending:
                            break
                        y = pending.pop(expected)
            elif sink is None:
                async for _ in recv:
                    count += 1
            else:
                async for y in recv:
                    sink(y)
                    count += 1
    return count


# -- hand-written asyncio (stdlib only) --------------------------------------------------------


async def asyncio_stream(
    source: Iterable[Any],
    call: Call,
    *,
    stages: int = STAGES,
    workers: int,
    buffer: int,
    window: int | None = None,
    sink: Sink | None = None,
) -> int:
    """Hand-written asyncio in the same shape: a producer task, one ``asyncio.Queue(buffer)``
    per edge (the last one read by the reader), ``workers`` tasks per stage, and the
    reader in the caller's task consuming the last queue, counting outputs. Shutdown by
    sentinel: the producer puts one per worker after the items, and the last worker of a
    stage to see its sentinel puts one per worker (one for the reader) downstream.

    With ``window``, items carry their sequence number and the reader restores order
    once, at the end, under an ``asyncio.Semaphore(window)`` taken by the producer per
    item and released when the reader emits it in order.
    """
    done = object()
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(buffer) for _ in range(stages + 1)]
    alive = [workers] * stages
    sem = asyncio.Semaphore(window) if window is not None else None

    async def producer() -> None:
        first = queues[0]
        if sem is None:
            for x in source:
                await first.put(x)
        else:
            for seq, x in enumerate(source):
                await sem.acquire()
                await first.put((seq, x))
        for _ in range(workers):
            await first.put(done)

    async def worker(i: int) -> None:
        inq, outq = queues[i], queues[i + 1]
        while True:
            x = await inq.get()
            if x is done:
                alive[i] -= 1
                if alive[i] == 0:  # the stage's last worker: every item has been put
                    for _ in range(workers if i + 1 < stages else 1):
                        await outq.put(done)
                return
            if sem is None:
                await outq.put(await call(x))
            else:
                seq, item = x
                await outq.put((seq, await call(item)))

    count = 0
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(producer())
        for i in range(stages):
            for _ in range(workers):
                tasks.create_task(worker(i))
        last = queues[-1]
        if sem is None:
            while (y := await last.get()) is not done:
                if sink is not None:
                    sink(y)
                count += 1
        else:
            pending: dict[int, Any] = {}
            expected = 0
            while (pair := await last.get()) is not done:
                seq, y = pair
                if seq != expected:
                    pending[seq] = y
                    continue
                while True:
                    if sink is not None:
                        sink(y)
                    count += 1
                    sem.release()
                    expected += 1
                    if expected not in pending:
                        break
                    y = pending.pop(expected)
    return count


# -- the workloads -----------------------------------------------------------------------------


def _checked(expected: int, run: Callable[[], int]) -> Callable[[], None]:
    def go() -> None:
        got = run()
        assert got == expected, f"{got} outputs, expected {expected}"

    return go


def _cpu_rows(
    key: str,
    shape: str,
    n: int,
    times: dict[str, dict[str, list[float]]],
    *,
    rounds: int,
    target_asyncio: float | None,
    detail: dict[str, Any],
) -> list[Row]:
    """pipeflow (default stream() and stream(buffer=16)) vs asyncio and vs Trio, on CPU."""
    info = {**detail, "clock": "cpu (time.process_time)", "rounds": rounds}
    wall = {name: t["wall"] for name, t in times.items()}
    rows = []
    for reader, label in (("pipeflow", "stream()"), ("pipeflow_buf16", "stream(buffer=16)")):
        for base, base_label, target in (
            ("asyncio", "hand-written asyncio", target_asyncio),
            ("trio", "hand-written Trio", None),
        ):
            is_default = reader == "pipeflow"
            rows.append(
                rate_row(
                    f"stream_{key}{'' if is_default else '_buf16'}_{base}",
                    f"{key.upper()}: {shape}, {n:,} items; {label}; CPU",
                    n,
                    times[reader]["cpu"],
                    times[base]["cpu"],
                    target=(">=", target) if target is not None and is_default else None,
                    baseline_label=base_label,
                    detail={**info, "reader": label, "wall_seconds": wall},
                    paired=True,
                )
            )
    return rows


def measure_identity(key: str, n: int, rounds: int, *, ordered: bool) -> list[Row]:
    """W1 (``ordered=False``) and W4 (``ordered=True``): 3 x 4 identity, buffer 16."""
    workers = 4
    pipeline = make_pipeline(
        identity, workers=workers, buffer=BUFFER, ordered=ordered, name=f"stream_{key}"
    )
    window = WINDOW if ordered else None

    def cases(m: int) -> dict[str, Callable[[], None]]:
        return {
            # The target's two sides next to each other in every round (paired ratios).
            "pipeflow": _checked(m, lambda: trio.run(pipeflow_stream, pipeline, range(m))),
            "asyncio": _checked(
                m,
                lambda: asyncio.run(
                    asyncio_stream(
                        range(m), identity, workers=workers, buffer=BUFFER, window=window
                    )
                ),
            ),
            "pipeflow_buf16": _checked(
                m,
                lambda: trio.run(
                    functools.partial(
                        pipeflow_stream, pipeline, range(m), reader_buffer=READER_BUFFER
                    )
                ),
            ),
            "trio": _checked(
                m,
                lambda: trio.run(
                    functools.partial(
                        trio_stream,
                        range(m),
                        identity,
                        workers=workers,
                        buffer=BUFFER,
                        window=window,
                    )
                ),
            ),
        }

    for warm in cases(max(1, n // 20)).values():  # first-call costs are not per item
        warm()
    progress(f"stream {key}: {rounds} rounds x {n:,} items, 4 systems interleaved")
    times = interleaved_clocks(cases(n), rounds)
    order = ", ordered=True (baselines reorder once, window 256)" if ordered else ""
    shape = f"{STAGES} x {workers} identity async, buffer {BUFFER}{order}"
    return _cpu_rows(
        key,
        shape,
        n,
        times,
        rounds=rounds,
        target_asyncio=1.0,
        detail={
            "stages": STAGES,
            "workers": workers,
            "buffer": BUFFER,
            "ordered": ordered,
            "window": window,
        },
    )


def measure_io(n: int, rounds: int) -> list[Row]:
    """W2: 3 x 50 workers, 10 ms sleeps, wall clock."""
    workers = 50
    pipeline = make_pipeline(trio_io, workers=workers, name="stream_w2")
    buffer = pipeline.stages[0].options.buffer_size  # the default: one slot per worker
    # pipeflow next to the target's baseline (Trio) and to Trio's ceiling in every round
    # (paired ratios).
    cases = {
        "trio": _checked(
            n,
            lambda: trio.run(
                functools.partial(trio_stream, range(n), trio_io, workers=workers, buffer=buffer)
            ),
        ),
        "pipeflow": _checked(n, lambda: trio.run(pipeflow_stream, pipeline, range(n))),
        "ceiling": _checked(n, lambda: trio.run(trio_sleepers, n, STAGES * workers)),
        "asyncio": _checked(
            n,
            lambda: asyncio.run(
                asyncio_stream(range(n), asyncio_io, workers=workers, buffer=buffer)
            ),
        ),
    }
    progress(f"stream w2: {rounds} rounds x {n:,} items, 4 cases interleaved")
    times = interleaved_clocks(cases, rounds)
    wall = {name: t["wall"] for name, t in times.items()}
    shape = f"{STAGES} x {workers} sleep {LATENCY * 1000:g} ms, {n:,} items; stream(); wall"
    detail = {
        "stages": STAGES,
        "workers": workers,
        "buffer": buffer,
        "latency": LATENCY,
        "rounds": rounds,
        "clock": "wall",
        "cpu_seconds": {name: t["cpu"] for name, t in times.items()},
    }
    bound = workers / LATENCY
    pf = n / median(wall["pipeflow"])
    return [
        rate_row(
            "stream_w2_trio",
            f"W2: {shape}",
            n,
            wall["pipeflow"],
            wall["trio"],
            target=(">=", 1.0),
            baseline_label="hand-written Trio",
            detail=detail,
            paired=True,
        ),
        Row(
            benchmark="stream_w2_bound",
            workload=f"W2: {shape}; vs Little's Law bound",
            unit="items/s",
            pipeflow=pf,
            baseline=bound,
            ratio=pf / bound,
            target=(">=", 0.85),
            baseline_label="bound",
            detail={
                **detail,
                "bound": bound,
                "trio_fraction_of_bound": n / median(wall["trio"]) / bound,
                "asyncio_fraction_of_bound": n / median(wall["asyncio"]) / bound,
                "trio_ceiling_fraction_of_bound": n / median(wall["ceiling"]) / bound,
                # The bound is a steady-state rate; a finite run also fills and drains
                # the pipeline (the first item needs one sleep per stage before the
                # last stage starts): n items could take no less than this.
                "finite_run_fraction_of_bound": n / (n / bound + (STAGES - 1) * LATENCY) / bound,
                # How busy each side kept the CPU (CPU / wall): near 1.0, the event loop
                # is saturated and every sleep overshoots by more.
                "cpu_busy": {
                    name: median(t["cpu"]) / median(t["wall"]) for name, t in times.items()
                },
            },
        ),
        rate_row(
            "stream_w2_ceiling",
            f"W2: {shape}; vs Trio's ceiling (the same sleeps in {STAGES * workers} bare tasks)",
            n,
            wall["pipeflow"],
            wall["ceiling"],
            # Information: a sleep of 10 ms takes longer on Trio (epoll waits in whole
            # milliseconds, rounded up, then the wake-up), so even tasks that only sleep
            # fall short of Little's Law's bound; this row says how close pipeflow
            # comes to what Trio itself allows.
            target=None,
            baseline_label="bare Trio sleepers",
            detail=detail,
            paired=True,
        ),
        rate_row(
            "stream_w2_cpu",
            f"W2: {shape.replace('; wall', '; CPU')}",
            n,
            times["pipeflow"]["cpu"],
            times["trio"]["cpu"],
            # Information: on a loaded machine the wall-clock rows are CPU-starved (even
            # hand-written Trio spends ~0.25 ms of CPU per item here); this row says
            # whether pipeflow spends more CPU per item than Trio does.
            target=None,
            baseline_label="hand-written Trio",
            detail={**detail, "clock": "cpu (time.process_time)"},
            paired=True,
        ),
        rate_row(
            "stream_w2_asyncio",
            f"W2: {shape}",
            n,
            wall["pipeflow"],
            wall["asyncio"],
            target=None,
            baseline_label="hand-written asyncio",
            detail=detail,
            paired=True,
        ),
    ]


def measure_threads(n: int, rounds: int) -> list[Row]:
    """threads: 3 x 8 workers of a plain ``def`` vs per-item ``trio.to_thread.run_sync``."""
    workers = 8
    pipeline = make_pipeline(plain_identity, workers=workers, name="stream_threads")
    buffer = pipeline.stages[0].options.buffer_size
    per_item = functools.partial(trio.to_thread.run_sync, plain_identity)

    def cases(m: int) -> dict[str, Callable[[], None]]:
        return {
            "pipeflow": _checked(m, lambda: trio.run(pipeflow_stream, pipeline, range(m))),
            "trio": _checked(
                m,
                lambda: trio.run(
                    functools.partial(
                        trio_stream, range(m), per_item, workers=workers, buffer=buffer
                    )
                ),
            ),
        }

    for warm in cases(max(1, n // 20)).values():
        warm()
    progress(f"stream threads: {rounds} rounds x {n:,} items, 2 systems interleaved")
    times = interleaved_clocks(cases(n), rounds)
    shape = f"{STAGES} x {workers} plain def identity (threads), {n:,} items; stream()"
    detail = {"stages": STAGES, "workers": workers, "buffer": buffer, "rounds": rounds}
    base_label = "Trio to_thread per item"  # trio.to_thread.run_sync(f, x)
    return [
        rate_row(
            "stream_threads_wall",
            f"threads: {shape}; wall",
            n,
            times["pipeflow"]["wall"],
            times["trio"]["wall"],
            target=(">=", 2.0),
            baseline_label=base_label,
            detail={**detail, "clock": "wall"},
            paired=True,
        ),
        rate_row(
            "stream_threads_cpu",
            f"threads: {shape}; CPU (all threads)",
            n,
            times["pipeflow"]["cpu"],
            times["trio"]["cpu"],
            target=None,
            baseline_label=base_label,
            detail={**detail, "clock": "cpu (time.process_time, all threads)"},
            paired=True,
        ),
    ]


def measure_wide(n: int, rounds: int, workers: int = 1_000) -> list[Row]:
    """wide: 3 x 1,000 identity workers, CPU time, vs Trio."""
    pipeline = make_pipeline(identity, workers=workers, name="stream_wide")
    buffer = pipeline.stages[0].options.buffer_size

    def cases(m: int) -> dict[str, Callable[[], None]]:
        return {
            "pipeflow": _checked(m, lambda: trio.run(pipeflow_stream, pipeline, range(m))),
            "trio": _checked(
                m,
                lambda: trio.run(
                    functools.partial(
                        trio_stream, range(m), identity, workers=workers, buffer=buffer
                    )
                ),
            ),
        }

    for warm in cases(max(1, n // 20)).values():
        warm()
    progress(f"stream wide: {rounds} rounds x {n:,} items, 2 systems interleaved")
    times = interleaved_clocks(cases(n), rounds)
    shape = f"{STAGES} x {workers:,} identity async, {n:,} items; stream(); CPU"
    return [
        rate_row(
            "stream_wide_trio",
            f"wide: {shape}",
            n,
            times["pipeflow"]["cpu"],
            times["trio"]["cpu"],
            target=(">=", 1.0),
            baseline_label="hand-written Trio",
            detail={
                "stages": STAGES,
                "workers": workers,
                "buffer": buffer,
                "rounds": rounds,
                "clock": "cpu (time.process_time)",
                "wall_seconds": {name: t["wall"] for name, t in times.items()},
            },
            paired=True,
        )
    ]


async def paced(n: int, rate: float) -> AsyncIterator[float]:
    """``n`` items at ``rate`` items/s (each due at ``start + i / rate``; the source
    sleeps until then), each item being the ``perf_counter()`` at which it was emitted."""
    start = trio.current_time()
    for i in range(n):
        await trio.sleep_until(start + i / rate)
        yield time.perf_counter()


def measure_latency(n: int, rounds: int, rate: float = 2_000.0) -> list[Row]:
    """latency: 3 x 4 identity stages, source paced at ``rate``; p50 and p99 end to end."""
    workers = 4
    pipeline = make_pipeline(identity, workers=workers, name="stream_latency")
    buffer = pipeline.stages[0].options.buffer_size
    samples: dict[str, list[float]] = {}
    p50: dict[str, list[float]] = {"pipeflow": [], "trio": []}
    p99: dict[str, list[float]] = {"pipeflow": [], "trio": []}

    def case(name: str, run: Callable[[Sink], int]) -> Callable[[], None]:
        def go() -> None:
            latencies: list[float] = []

            def sink(emitted: float) -> None:
                latencies.append(time.perf_counter() - emitted)

            assert run(sink) == n
            samples[name] = latencies
            p50[name].append(percentile(latencies, 50))
            p99[name].append(percentile(latencies, 99))

        return go

    cases = {
        "pipeflow": case(
            "pipeflow",
            lambda sink: trio.run(
                functools.partial(pipeflow_stream, pipeline, paced(n, rate), sink=sink)
            ),
        ),
        "trio": case(
            "trio",
            lambda sink: trio.run(
                functools.partial(
                    trio_stream, paced(n, rate), identity, workers=workers, buffer=buffer, sink=sink
                )
            ),
        ),
    }
    progress(f"stream latency: {rounds} rounds x {n:,} items at {rate:,.0f}/s, interleaved")
    times = interleaved_clocks(cases, rounds)
    shape = f"{STAGES} x {workers} identity async, paced {rate:,.0f}/s, {n:,} items; stream()"
    detail = {
        "stages": STAGES,
        "workers": workers,
        "buffer": buffer,
        "rate": rate,
        "rounds": rounds,
        "clock": "wall (perf_counter per item)",
        "p50_ms_per_round": {k: [v * 1000 for v in vs] for k, vs in p50.items()},
        "p99_ms_per_round": {k: [v * 1000 for v in vs] for k, vs in p99.items()},
        "ratio_of_medians": {
            q: median(d["pipeflow"]) / median(d["trio"]) for q, d in (("p50", p50), ("p99", p99))
        },
        "max_ms_last_round": {k: max(v) * 1000 for k, v in samples.items()},
        "wall_seconds": {name: t["wall"] for name, t in times.items()},
        "cpu_seconds": {name: t["cpu"] for name, t in times.items()},
    }
    rows = []
    for q, per_round in (("p50", p50), ("p99", p99)):
        pf, base = median(per_round["pipeflow"]) * 1000, median(per_round["trio"]) * 1000
        rows.append(
            Row(
                benchmark=f"stream_latency_{q}",
                workload=f"latency {q}: {shape}",
                unit="ms",
                pipeflow=pf,
                baseline=base,
                # The two sides run next to each other in every round: the median of
                # the rounds' own ratios (a latency: pipeflow's over Trio's).
                ratio=paired_ratio(per_round["trio"], per_round["pipeflow"]),
                target=("<=", 1.0),
                baseline_label="hand-written Trio",
                detail=detail,
            )
        )
    return rows


#: The workloads, by the name ``--only`` takes.
PARTS = ("w1", "w4", "w2", "threads", "wide", "latency")


def measure(
    n_identity: int = 200_000,
    n_io: int = 5_000,
    n_threads: int = 20_000,
    n_wide: int = 50_000,
    n_latency: int = 6_000,
    rounds: int = 5,
    wide_workers: int = 1_000,
    only: Sequence[str] = PARTS,
) -> list[Row]:
    """Every workload (or those ``only`` names), each timed in ``rounds`` interleaved
    rounds."""
    parts: dict[str, Callable[[], list[Row]]] = {
        "w1": lambda: measure_identity("w1", n_identity, rounds, ordered=False),
        "w4": lambda: measure_identity("w4", n_identity, rounds, ordered=True),
        "w2": lambda: measure_io(n_io, rounds),
        "threads": lambda: measure_threads(n_threads, rounds),
        "wide": lambda: measure_wide(n_wide, rounds, wide_workers),
        "latency": lambda: measure_latency(n_latency, rounds),
    }
    return [row for name in PARTS if name in only for row in parts[name]()]


#: Arguments of a short smoke run (``--quick``): seconds, figures indicative only.
QUICK = {
    "n_identity": 2_000,
    "n_io": 200,
    "n_threads": 300,
    "n_wide": 2_000,
    "n_latency": 200,
    "rounds": 1,
    "wide_workers": 1_000,
}


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, measure, QUICK, argv, parts=PARTS)


if __name__ == "__main__":
    sys.exit(main())
