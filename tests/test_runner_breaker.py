"""Today's runner changes as a hostile user drives them: chunks of ``async def`` items run
by one driver (items that wait give the rest back), ordered stages in a row restoring
the order once, the edge's end seen by every parked receiver, and the signal gate held
around the whole run. Each test names what it guards; each bug found this way has a test
that failed before its fix."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import subprocess
import sys
import textwrap

import pytest
import trio

from pipeflow import Failed, Pipeline, PipelineFull, StageError, stage
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


# -- chunks of async def items under random stops ---------------------------------------------


def _fixed(*parts):
    """A number in [0, 1) fixed by ``parts`` (per stage and item), the same every run."""
    return random.Random(":".join(map(str, parts))).random()


class _Ack:
    def __init__(self, acked, item):
        self.acked, self.item, self.pending = acked, item, 1

    def add(self, n):
        self.pending += n

    def done(self):
        self.pending -= 1
        assert self.pending >= 0, f"{self.item} acked too often"
        if self.pending == 0:
            self.acked.append(self.item)


class _AckingSource:
    def __init__(self, n):
        self.n = n
        self.acked = []

    @contextlib.asynccontextmanager
    async def __pipeflow_open__(self, *, capacity):
        async def entries():
            for i in range(self.n):
                await trio.lowlevel.checkpoint()
                yield i, _Ack(self.acked, i)

        yield entries()


def _quick_then_waiting_stage(rng, i, fail_rate, dead_letter):
    """An ``async def`` map (or a flat-map, an inline plain function, one with retries or
    a timeout, one with a resource) whose items are mostly instant and some wait (a
    checkpoint, a short sleep, a longer one); some fail before or after waiting."""
    kind = rng.choice(["async", "async", "async", "agen", "inline", "policy", "resource"])
    errors = rng.choice(["collect", "skip", "embed", "fail_fast"])
    name = f"s{i}_{kind}_{errors}"
    if errors == "fail_fast":
        fail_rate /= 10
    options = {"name": name, "workers": rng.choice([1, 1, 2, 4, 8]), "errors": errors}
    options["buffer"] = rng.choice([0, 1, 4, 16])
    options["ordered"] = rng.random() < 0.6
    if dead_letter is not None and rng.random() < 0.8:
        options["dead_letter"] = dead_letter
    p_wait = rng.choice([0.0, 0.02, 0.2, 1.0])
    how = rng.choice(["checkpoint", "short", "sleep"])
    fail_first = rng.random() < 0.5

    async def maybe_wait(x):
        if _fixed(name, "wait", x) < p_wait:
            if how == "checkpoint":
                await trio.lowlevel.checkpoint()
            elif how == "short":
                await trio.sleep(0.0001)
            else:
                await trio.sleep(0.01 * _fixed(name, "for", x))

    def check(x, attempt=0):
        if isinstance(x, int) and _fixed(name, "fail", attempt, x) < fail_rate:
            raise ValueError(f"{name} fails on {x}")

    if kind == "agen":

        @stage(**options)
        async def spread(x):
            check(x)
            await maybe_wait(x)
            for _ in range(int(_fixed(name, "n", x) * 3)):
                yield x

        return spread
    if kind == "inline":

        @stage(**options, run_in="task")
        def inline(x):
            check(x)
            return x

        return inline
    if kind == "policy":
        extra = rng.choice([{"retries": 1}, {"timeout": 0.005}, {"retries": 2, "timeout": 0.008}])

        @stage(**options, **extra)
        async def with_policy(x):
            await maybe_wait(x)
            check(x, trio.current_time())  # a retry may pass
            return x

        return with_policy
    opened = []

    @contextlib.asynccontextmanager
    async def connection():
        opened.append(1)
        try:
            yield "conn"
        finally:
            await trio.sleep(0.001)
            opened.pop()

    async def body(x):
        if fail_first:
            check(x)
        await maybe_wait(x)
        if not fail_first:
            check(x)
        return x

    if kind == "resource":

        @stage(**options, resource=connection)
        async def with_conn(x, conn):
            return await body(x)

        with_conn.opened = opened
        return with_conn

    @stage(**options)
    async def work(x):
        return await body(x)

    return work


def _origin(x):
    return _origin(x.item) if isinstance(x, Failed) else x


@pytest.mark.parametrize("seed", range(60))
async def test_quick_chunks_that_sometimes_wait_under_random_stops(seed, autojump_clock):
    """Chains of mostly-instant ``async def`` stages (their chunks run in one driver; an
    item that waits gives the rest back) mixed with flat-maps, retries, timeouts and
    resources, ordered or not, 1 or many workers, every error policy with and without a
    dead-letter sink (a callable or a stage), fed by a list, an async generator or an
    acking source through arun, stream or open, and stopped at a random moment (outer
    cancellation, leaving stream early, a fail-fast failure) or not at all. Always:
    every stage balances, unfinished matches cancelled, what a stage hands on the next
    counts in, resources are closed, nothing is left running, no item is acked twice or
    acked while unfinished, all-ordered chains give input order; a run that ends
    normally has every failure in a callable dead-letter sink and acks every item."""
    rng = random.Random(seed)
    letters = []
    sink = rng.choice(["none", "callable", "stage"])
    dead_letter = None
    if sink == "callable":
        dead_letter = letters.append
    elif sink == "stage":

        @stage(name="letters", workers=rng.choice([1, 2]), buffer=rng.choice([0, 4]))
        async def keep(failed):
            await trio.sleep(0.001 * (rng.random() < 0.3))
            letters.append(failed)

        dead_letter = keep
    fail_rate = rng.choice([0.0, 0.02, 0.1, 0.5])
    chain = _quick_then_waiting_stage(rng, 0, fail_rate, dead_letter)
    for i in range(1, rng.randint(1, 4)):
        chain = chain | _quick_then_waiting_stage(rng, i, fail_rate, dead_letter)
    pipeline = Pipeline(chain)
    n = rng.choice([1, 40, 300])
    acking = _AckingSource(n) if rng.random() < 0.3 else None

    async def agen():
        for i in range(n):
            if i % 5 == 0:
                await trio.sleep(0.0005)
            yield i

    source = acking or rng.choice([range(n), agen()])
    mode = rng.choice(["arun", "stream", "open"])
    stop = rng.choice(["none", "outer", "leave"])
    seen, result, stopped = [], None, False
    with trio.fail_after(1000):
        try:
            with trio.move_on_after(rng.random() * 0.3 if stop == "outer" else 1000) as scope:
                if mode == "arun":
                    result = await pipeline.arun(source)
                    seen = list(result.outputs)
                elif mode == "stream":
                    outputs = None
                    try:
                        async with pipeline.stream(source, buffer=rng.choice([0, 32])) as outputs:
                            async for out in outputs:
                                seen.append(out)
                                if stop == "leave" and len(seen) > n * rng.random():
                                    stopped = True
                                    break
                    finally:
                        result = outputs.result if outputs is not None else None
                else:
                    flow = None
                    try:
                        async with pipeline.open() as flow:
                            for i in range(n):
                                try:
                                    flow.send_nowait(i)
                                except PipelineFull:
                                    await flow.send(i)
                    finally:
                        result = flow.result if flow is not None else None
            stopped = stopped or scope.cancelled_caught
        except StageError as exc:
            assert any(s.options.errors == "fail_fast" for s in pipeline.stages)
            result, stopped = exc.result, True
    if result is None:
        assert mode == "arun"  # cancelled from outside: nothing to look at
        assert stopped
    else:
        assert_balanced(result, None if stopped and sink == "stage" else pipeline)
        if all(s.options.ordered for s in pipeline.stages):
            assert [_origin(o) for o in seen] == sorted(_origin(o) for o in seen)
        if not stopped:
            assert [] == result.unfinished
            if sink == "callable":
                with_sink = [s for s in pipeline.stages if s.options.dead_letter is not None]
                assert len(letters) == sum(result.stats[s.name].failed for s in with_sink)
        if acking is not None:
            unfinished = {x for name, x in result.unfinished if name != "letters"}
            assert len(acking.acked) == len(set(acking.acked))
            assert not unfinished & set(acking.acked)
            if not stopped and mode != "open":
                assert list(range(n)) == sorted(acking.acked)
    for st in pipeline.stages:
        assert [] == getattr(st, "opened", []), st.name
    assert_nothing_left_running()


# -- signals ---------------------------------------------------------------------------------

SIGNAL_ROUNDS = textwrap.dedent(
    """
    import contextlib, json, os, random, signal, sys, threading, time, traceback
    import trio
    from pipeflow import Interrupted, Pipeline, stage

    seen = []  # signals that reached the application's own handlers: (signum, function)

    def app_handler(signum, frame):
        seen.append((signum, frame.f_code.co_name if frame else None))

    signal.signal(signal.SIGINT, app_handler)
    signal.signal(signal.SIGTERM, app_handler)

    @contextlib.asynccontextmanager
    async def conn():
        try:
            yield "c"
        finally:
            await trio.sleep(0.02)  # a connection that takes a moment to close

    def build(rng):
        waits = [rng.choice([0, 0, 0.001, 0.005]) for _ in range(1000)]

        @stage(workers=rng.choice([1, 3]), resource=conn, ordered=rng.random() < 0.5)
        async def fetch(x, c):
            if waits[x]:
                await trio.sleep(waits[x])
            return x

        @stage(workers=2, ordered=rng.random() < 0.5)
        async def parse(x):
            return x

        @stage(workers=2)
        def store(x):
            return x

        return Pipeline(fetch | parse | store)

    for r in range(int(sys.argv[1])):
        rng = random.Random(r)
        n = rng.choice([20, 100, 300])
        grace = rng.choice([0.02, 5.0])
        t = time.monotonic()
        build(random.Random(r)).run(range(n), handle_signals=False)
        natural = time.monotonic() - t
        # Aim at the end of the run: its last items, its drain, its teardown, just after.
        at = natural * rng.uniform(0.6, 1.2)
        plan = []
        for _ in range(rng.randint(1, 3)):
            plan.append((at, rng.choice([signal.SIGINT, signal.SIGTERM])))
            at += rng.choice([0.0005, 0.003, 0.02])
        sent = []

        def sender():
            t0 = time.monotonic()
            for at, signum in plan:
                time.sleep(max(0.0, at - (time.monotonic() - t0)))
                sent.append((time.monotonic(), signum))
                os.kill(os.getpid(), signum)

        seen.clear()
        thread = threading.Thread(target=sender)
        t_start = time.monotonic()
        thread.start()
        out = {"round": r, "n": n, "grace": grace, "plan": plan}
        try:
            out["outputs"] = len(build(random.Random(r)).run(range(n), grace=grace).outputs)
            out["outcome"] = "done"
        except Interrupted as stop:
            out["outcome"] = "interrupted"
            out["signal"] = stop.signal
            out["stats"] = {
                name: [s.items_in, s.ok + s.filtered + s.failed + s.dropped + s.cancelled,
                       s.cancelled, s.inflight]
                for name, s in stop.result.stats.items()
            }
            out["unfinished"] = len(stop.result.unfinished)
        except BaseException:
            out["outcome"] = "error"
            out["error"] = traceback.format_exc()[-2000:]
        t_end = time.monotonic()
        thread.join()
        time.sleep(0.02)  # signals that came after the run reach the app's handlers
        out["stop_after"] = t_end - t_start - plan[0][0]
        out["sent_before_end"] = sum(1 for t, _ in sent if t < t_end)
        out["seen"] = seen[:]
        print(json.dumps(out), flush=True)
    """
)


def test_signals_at_random_moments_near_the_end_of_a_run(tmp_path):
    """Rounds of ``Pipeline.run()`` in a real process, each hit by one to three real
    SIGINT/SIGTERM at random moments around its end (last items, drain, teardown of
    resources and threads, just after). Each round either raises Interrupted (the
    signal, a balanced result, every cancelled item listed as unfinished, within the
    grace period) or finishes every item; a signal that came too late to stop it is
    raised again as the gate closes (the application's own handler sees it), never
    lost, and nothing else comes out (no bare KeyboardInterrupt, no other error)."""
    script = tmp_path / "rounds.py"
    script.write_text(SIGNAL_ROUNDS)
    proc = subprocess.run(
        [sys.executable, str(script), "10"], capture_output=True, text=True, timeout=120
    )
    assert 0 == proc.returncode, proc.stderr[-3000:]
    rounds = [json.loads(line) for line in proc.stdout.splitlines()]
    assert 10 == len(rounds)
    for r in rounds:
        assert r["outcome"] in ("done", "interrupted"), r
        if r["outcome"] == "done":
            assert r["n"] == r["outputs"], r
            if r["sent_before_end"]:
                assert r["seen"], r  # raised again when the gate closed (or after)
            continue
        assert r["signal"] in {signum for _, signum in r["plan"]}, r
        for items_in, accounted, _, inflight in r["stats"].values():
            assert (items_in, 0) == (accounted, inflight), r
        assert sum(s[2] for s in r["stats"].values()) == r["unfinished"], r
        assert r["stop_after"] < r["grace"] + 5, r  # loaded CI machines: a wide margin
        # Stopped by the signal: none is raised again when the gate closes.
        assert "__exit__" not in [where for _, where in r["seen"]], r


# -- the lone item's hops, the Lot, the reader's take_ready (issue 11) ------------------------


def _mixed_stage(rng, i):
    """A stage of a kind today's hot path treats differently: a quick async map (its
    items take the lone item's lane), one that waits now and then, a keyed or
    batch stage, an autoscaled one (workers retire while parked in the Lot), an inline
    plain function, an async generator."""
    kind = rng.choice(["quick", "quick", "waits", "keyed", "batch", "auto", "inline", "agen"])
    name = f"m{i}_{kind}"
    options = {"name": name, "buffer": rng.choice([0, 1, 8, None])}
    if rng.random() < 0.3 and kind not in ("batch", "keyed"):
        options["ordered"] = True
    if rng.random() < 0.2:
        options["errors"] = rng.choice(["skip", "embed", "collect"])
    fails = rng.choice([0, 0, 7, 23])

    def check(x):
        if fails and isinstance(x, int) and x % fails == 3:
            raise ValueError(f"{name} fails on {x}")

    if kind == "batch":

        @stage(**options, workers=rng.choice([1, 2]), batch=rng.choice([2, 5]), batch_timeout=0.05)
        async def batched(xs):
            await trio.sleep(0.001 * rng.random())
            return xs[0] if xs else 0

        return batched
    if kind == "agen":

        @stage(**options, workers=rng.choice([1, 3]))
        async def spread(x):
            check(x)
            for _ in range(x % 3 if isinstance(x, int) else 1):
                yield x

        return spread
    if kind == "inline":

        @stage(**options, workers=rng.choice([1, 2]), run_in="task")
        def inline(x):
            check(x)
            return x

        return inline
    if kind == "keyed":
        options["key"] = lambda x: x % 5 if isinstance(x, int) else 0
    if kind == "auto":
        options["workers"] = (1, rng.choice([2, 4]))
    else:
        options.setdefault("workers", rng.choice([1, 2, 4, 8]))
    waits = kind in ("waits", "auto", "keyed")

    @stage(**options)
    async def work(x):
        check(x)
        if waits and isinstance(x, int) and x % 4 == 1:
            await trio.sleep(rng.choice([0, 0.001, 0.01]))
        return x

    return work


def _check_gauges(pipeline, previous):
    """What a monitor reads while items flow: no gauge negative, no more busy workers
    than workers, counters that only go up."""
    samples = pipeline.samples()
    for name, s in samples.items():
        assert s.inflight >= 0, s
        assert s.queue_depth >= 0, s
        assert 0 <= s.busy_workers <= s.workers, s
        assert s.wait_sum >= 0, s
        assert s.duration_sum >= 0, s
        assert s.oldest_inflight_seconds >= 0, s
        before = previous.get(name)
        if before is not None:
            for field in ("ok", "failed", "filtered", "dropped", "cancelled", "retried"):
                assert getattr(s, field) >= getattr(before, field), (field, before, s)
            assert sum(s.wait_counts) >= sum(before.wait_counts), s
            assert sum(s.duration_counts) >= sum(before.duration_counts), s
        previous[name] = s
    for w in pipeline.current_workers() or []:
        assert w.seconds >= 0, w
    for s in (pipeline.current_stats() or {}).values():
        assert s.inflight >= 0, s
        assert s.busy_workers >= 0, s
        assert s.items_in >= s.ok + s.filtered + s.failed + s.dropped + s.cancelled, s


@pytest.mark.parametrize("seed", range(40))
async def test_mixed_chains_watched_while_they_run_under_random_stops(seed, autojump_clock):
    """Random chains of quick, waiting, keyed, batch, autoscaled, inline and flat-map
    stages fed by a list, an async generator with long gaps (autoscaled workers retire
    while parked) or an endless async generator that never awaits, read by arun, a
    stream(buffer=0 or 32) or open() fed from several tasks; a monitor reads samples(),
    current_workers() and current_stats() between every scheduler round it gets. Gauges
    never go negative, busy never exceeds workers, counters only go up, every stage
    balances at the end, waits are never negative, nothing is left running."""
    rng = random.Random(seed)
    chain = _mixed_stage(rng, 0)
    for i in range(1, rng.randint(1, 4)):
        chain = chain | _mixed_stage(rng, i)
    pipeline = Pipeline(chain)
    n = rng.choice([1, 50, 300])
    source_kind = rng.choice(["list", "gaps", "endless"])

    async def gaps():
        for i in range(n):
            if i % 97 == 96:
                await trio.sleep(rng.choice([0.5, 40]))
            yield i

    async def endless():
        i = 0
        while True:
            yield i
            i += 1

    mode = rng.choice(["arun", "stream", "open"]) if source_kind != "endless" else "stream"
    stop = rng.choice(["none", "outer", "leave"]) if source_kind != "endless" else "leave"
    leave_at = rng.randint(0, n)
    previous = {}
    result, stopped, seen = None, False, []

    async def monitor():
        for _ in range(800):  # a budget: each look costs about a millisecond
            _check_gauges(pipeline, previous)
            await trio.sleep(rng.choice([0, 0, 0.001, 0.05]))

    with trio.fail_after(10_000):
        async with trio.open_nursery() as watch:
            watch.start_soon(monitor)
            try:
                with trio.move_on_after(rng.random() * 3 if stop == "outer" else 10_000) as scope:
                    if mode == "arun":
                        source = range(n) if source_kind == "list" else gaps()
                        result = await pipeline.arun(source)
                        seen = result.outputs
                    elif mode == "stream":
                        source = {"list": range(n), "gaps": gaps(), "endless": endless()}[
                            source_kind
                        ]
                        outputs = None
                        try:
                            async with pipeline.stream(
                                source, buffer=rng.choice([0, 32])
                            ) as outputs:
                                async for out in outputs:
                                    seen.append(out)
                                    if stop == "leave" and len(seen) >= leave_at:
                                        stopped = True
                                        break
                        finally:
                            result = outputs.result if outputs is not None else None
                    else:
                        flow = None
                        try:
                            async with pipeline.open() as flow, trio.open_nursery() as feeders:
                                for f in range(rng.randint(1, 4)):

                                    async def feed(f=f):
                                        for i in range(f, n, 4):
                                            how = rng.choice(["send", "send", "nowait", "offer"])
                                            if how == "send":
                                                await flow.send(i)
                                            elif how == "offer":
                                                flow.offer(i)
                                            else:
                                                try:
                                                    flow.send_nowait(i)
                                                except PipelineFull:
                                                    await flow.send(i)
                                            if i % 9 == 0:
                                                await trio.sleep(0.001)

                                    feeders.start_soon(feed)
                        finally:
                            result = flow.result if flow is not None else None
                stopped = stopped or scope.cancelled_caught
            except StageError as exc:
                result, stopped = exc.result, True
            _check_gauges(pipeline, previous)
            watch.cancel_scope.cancel()
    if result is None:
        assert mode == "arun"
        assert stopped
    else:
        assert_balanced(result, pipeline if not stopped else None)
        for s in result.stats.values():
            assert s.queue_wait_mean >= 0, s
            assert s.duration_mean >= 0, s
            assert s.busy_seconds >= 0, s
            assert s.blocked_seconds >= 0, s
            assert s.busy_workers == 0, s
        if not stopped and source_kind != "endless":
            assert [] == result.unfinished
    assert_nothing_left_running()


@pytest.mark.parametrize("reader", ["arun", "stream"])
async def test_a_worker_that_handed_its_item_on_is_not_shown_busy_with_it(reader, autojump_clock):
    """At low load a quick stage's worker hands each item on and wakes the next stage,
    which runs the item in the next scheduler round: what a monitor reads then (the next
    stage's function reads it here, as a /workers page or a scrape in that round would)
    must not show the first stage still calling that item, or busy with nothing in
    flight. (Seen when the worker stepped aside before its bookkeeping: "calling 1" in
    both stages, workers_busy 1, inflight 0.) Once the second stage's items have been
    quick, the first stage's worker runs each item on through it itself (runon.py): it
    is then "sending", its own call recorded."""
    seen = []

    @stage(workers=1)
    async def first(x):
        await trio.sleep(0.0004)  # quick enough to count as quick (CHUNK_BELOW)
        return x

    @stage(workers=1)
    async def second(x):
        workers = [w for w in pipeline.current_workers() if w.stage == "first"]
        sample = pipeline.samples()["first"]
        seen.append(
            (
                x,
                [(w.state, w.item, w.seconds) for w in workers],
                sample.busy_workers,
                sample.inflight,
            )
        )
        return x

    pipeline = Pipeline(first | second)

    async def trickle():
        for i in range(20):
            await trio.sleep(0.01)  # the stages are idle when each item comes
            yield i

    if reader == "arun":
        result = await pipeline.arun(trickle())
    else:
        async with pipeline.stream(trickle()) as outputs:
            async for _ in outputs:
                pass
        result = outputs.result
    assert list(range(20)) == sorted(result.outputs if reader == "arun" else [x for x, *_ in seen])
    for x, workers, busy, inflight in seen:
        # Waiting for its next item (or gone, after the last), or running it on.
        assert all(
            state in ("waiting", "sending") and item is None for state, item, _ in workers
        ), (x, workers)
        assert (busy, inflight) == (0, 0), (x, workers, busy, inflight)
    states = [workers[0][0] for _, workers, _, _ in seen if workers]
    # The first item finds the second stage not yet known to be quick: handed over.
    assert states == ["waiting"] + ["sending"] * (len(states) - 1), states
    assert_balanced(result, pipeline)


@pytest.mark.parametrize("workers", [(1, 4), (2, 8), (1, 1)])
async def test_an_autoscaled_quick_stage_takes_a_lone_item_at_once(workers, autojump_clock):
    """Low load through an autoscaled stage whose items are quick: each item, coming
    alone, is taken at once by a parked worker. (Before the fix it waited in the queue
    for seconds, until the queue was 80% full and the autoscaler started a worker: the
    autoscaler counted as a receiver "at work", so the hand-over woke no parked worker.)"""

    @stage(workers=workers)
    async def scaled(t):
        return t

    @stage(workers=1)
    async def after(t):
        return t

    async def trickle():
        for _ in range(12):
            await trio.sleep(1)
            yield trio.current_time()

    latencies = []
    async with Pipeline(scaled | after).stream(trickle()) as outputs:
        async for t in outputs:
            latencies.append(trio.current_time() - t)
    assert [0.0] * 12 == latencies
    assert_balanced(outputs.result)


async def test_an_item_that_turns_out_slow_does_not_hold_up_the_items_after_it(autojump_clock):
    """A stage whose items are quick (so it takes chunks) has one item that waits 10 s
    (a cache miss, say). The items that come while it waits are taken at once by the
    stage's other, idle worker, not kept in the queue behind it (they waited 9, 8, 7 and
    6 s: head-of-line blocking with a worker idle)."""

    @stage(workers=2)
    async def lookup(x):
        i, _ = x
        if i == 5:
            await trio.sleep(10)
        return x

    async def trickle():
        for i in range(12):
            await trio.sleep(1)
            yield i, trio.current_time()

    latencies = {}
    async with Pipeline(lookup).stream(trickle()) as outputs:
        async for i, t in outputs:
            latencies[i] = trio.current_time() - t
    assert 10 == latencies.pop(5)
    assert {i: 0.0 for i in range(12) if i != 5} == latencies


async def test_items_that_need_nothing_downstream_pass_a_worker_blocked_downstream(
    autojump_clock,
):
    """A quick filter with two workers before a slow stage (20 s an item, no buffer): the
    second item it keeps leaves one worker blocked handing it on, the other idle. The
    items the filter drops, coming after, are taken at once by the idle worker (they
    waited 17, 16, 15, 14 s in the queue for the blocked one)."""
    dropped_after = {}

    @stage(workers=2, run_in="task")
    def pick(x):
        i, t = x
        if i not in (0, 2):
            dropped_after[i] = trio.current_time() - t
            return
        yield x

    @stage(workers=1, buffer=0)
    async def slow(x):
        await trio.sleep(20)
        return x

    async def trickle():
        for i in range(12):
            await trio.sleep(1)
            yield i, trio.current_time()

    await Pipeline(pick | slow).arun(trickle())
    assert {i: 0.0 for i in range(12) if i not in (0, 2)} == dropped_after


class _TaskSteps(trio.abc.Instrument):
    """Counts scheduler task steps: a measure of the runner's overhead per item that does
    not depend on the machine's speed."""

    def __init__(self):
        self.steps = 0

    def before_task_step(self, task):
        self.steps += 1


@pytest.mark.parametrize("workers", [4, 16])
async def test_an_async_source_that_never_waits_is_taken_in_chunks(workers):
    """An async generator that has its items at hand (it never waits) feeding a quick
    stage with several workers: the items go over in chunks, not one scheduler round
    each (at most one task step per item; 0.54-0.63 at 31ec5f1). Before the fix the
    source's task stepped aside after every item that woke a worker: 2.0 task steps per
    item, and 40k items/s through 4 quick workers became about 19k/s."""

    @stage(workers=workers)
    async def quick(x):
        return x

    async def at_hand():
        for i in range(3000):
            yield i

    counter = _TaskSteps()
    trio.lowlevel.add_instrument(counter)
    try:
        result = await Pipeline(quick).arun(at_hand(), collect=False)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert 3000 == result.stats["quick"].ok
    assert counter.steps / 3000 < 1.0
