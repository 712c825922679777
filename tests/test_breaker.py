"""The circuit breaker: its state machine driven directly (``BreakerRuntime``) and
through real runs, with exact times for cooldowns, probes and closing again."""

from __future__ import annotations

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from pipeflow import CircuitBreaker, CircuitOpen, Failed, Pipeline, Retry, StageError, stage
from pipeflow._policies import BreakerRuntime


@pytest.fixture(autouse=True)
def _structlog_as_found():
    """capture_logs() leaves structlog marked as configured; undo that after each test so
    later tests see pipeflow's default logging."""
    yield
    structlog.reset_defaults()


def new_runtime(**config):
    """A breaker's run-time state, with every state change recorded with its time."""
    changes = []
    runtime = BreakerRuntime(
        CircuitBreaker(**config),
        lambda old, new: changes.append((old, new, trio.current_time())),
    )
    return runtime, changes


# -- configuration --------------------------------------------------------------------------


def test_defaults():
    """The defaults: open at 50% of 20 calls (10 at least), 30 s cooldown, 1 probe, hold."""
    b = CircuitBreaker()
    assert (0.5, 20, 10, 30.0, 1, "hold") == (
        b.failure_rate,
        b.window,
        b.min_calls,
        b.cooldown,
        b.probes,
        b.when_open,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"failure_rate": 0}, ValueError, r"failure_rate= must be a number in \(0, 1\], got 0"),
        ({"failure_rate": 1.5}, ValueError, r"failure_rate= must be a number in \(0, 1\]"),
        ({"failure_rate": True}, ValueError, r"failure_rate= must be a number"),
        ({"window": 0}, ValueError, r"window= must be >= 1, got 0"),
        ({"min_calls": 1.5}, TypeError, r"min_calls= must be an int, got 1.5"),
        ({"cooldown": -1}, ValueError, r"cooldown= must be a finite number >= 0, got -1"),
        ({"probes": 0}, ValueError, r"probes= must be >= 1"),
        ({"when_open": "drop"}, ValueError, r"when_open= must be 'hold' or 'fail', got 'drop'"),
        ({"window": 5, "min_calls": 6}, ValueError, r"min_calls=6 cannot exceed window=5"),
    ],
)
def test_invalid_configuration_is_refused_with_the_option_named(kwargs, error, message):
    """Each bad value raises at construction, naming the option and the value."""
    with pytest.raises(error, match=message):
        CircuitBreaker(**kwargs)


def test_breaker_option_must_be_a_circuit_breaker():
    """breaker= takes a CircuitBreaker; anything else is refused at decoration."""
    with pytest.raises(
        TypeError, match=r"stage 'f': option breaker= must be a pipeflow.CircuitBreaker, got 3"
    ):

        @stage(breaker=3)
        async def f(x):
            return x


# -- the state machine, driven directly ------------------------------------------------------


async def test_opens_once_min_calls_and_failure_rate_are_reached(autojump_clock):
    """Closed until there are min_calls outcomes with a failure share >= failure_rate."""
    b, changes = new_runtime(failure_rate=0.5, window=10, min_calls=4)
    for ok in (False, False, False):  # 3 failures, but fewer than min_calls outcomes
        assert await b.admit() is False
        b.record(ok, probe=False)
    assert "closed" == b.state
    b.record(True, probe=False)  # 4 calls, 3 failed: 75% >= 50%? only checked on failure
    assert "closed" == b.state
    b.record(False, probe=False)  # 5 calls, 4 failed
    assert "open" == b.state
    assert [("closed", "open", 0.0)] == changes
    assert 1 == b.opened


async def test_failure_rate_below_the_threshold_stays_closed(autojump_clock):
    """One failure in four is 25%: a 50% breaker stays closed, however long it runs."""
    b, changes = new_runtime(failure_rate=0.5, window=8, min_calls=4)
    for i in range(100):
        await b.admit()
        b.record(i % 4 != 0, probe=False)
    assert "closed" == b.state
    assert [] == changes


async def test_window_forgets_old_outcomes(autojump_clock):
    """Only the last `window` outcomes count: old failures slide out."""
    b, _ = new_runtime(failure_rate=0.5, window=4, min_calls=4)
    for ok in (False, True, True, True, True):  # the failure has slid out
        b.record(ok, probe=False)
    b.record(False, probe=False)  # last four: T T T F → 25%
    assert "closed" == b.state
    b.record(False, probe=False)  # T T F F → 50%
    assert "open" == b.state


async def test_open_holds_callers_until_the_cooldown_then_one_probe(autojump_clock):
    """when_open="hold": admit() waits out the cooldown, then lets exactly `probes` in."""
    b, changes = new_runtime(failure_rate=1.0, window=1, min_calls=1, cooldown=10, probes=1)
    await trio.sleep(2)
    b.record(False, probe=False)
    assert "open" == b.state
    admitted = []

    async def caller(name):
        probe = await b.admit()
        admitted.append((name, probe, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "first")
        nursery.start_soon(caller, "second")
        await trio.sleep(20)
        # At t=12 one caller became the probe; the other waits while it is out.
        assert [(True, 12.0)] == [(p, t) for _, p, t in admitted]
        assert "half_open" == b.state
        b.record(True, probe=True)  # the probe succeeded at t=22
    assert [True, False] == [p for _, p, _ in admitted]
    assert 22.0 == admitted[1][2]
    assert "closed" == b.state
    assert [
        ("closed", "open", 2.0),
        ("open", "half_open", 12.0),
        ("half_open", "closed", 22.0),
    ] == changes


async def test_failed_probe_reopens_for_another_cooldown(autojump_clock):
    """A failing probe opens the breaker again; the next probe waits a full cooldown."""
    b, changes = new_runtime(failure_rate=1.0, window=1, min_calls=1, cooldown=5)
    b.record(False, probe=False)
    assert await b.admit() is True
    assert 5.0 == trio.current_time()
    await trio.sleep(1)
    b.record(False, probe=True)
    assert "open" == b.state
    assert await b.admit() is True
    assert 11.0 == trio.current_time()
    assert 2 == b.opened
    assert ["open", "half_open", "open", "half_open"] == [new for _, new, _ in changes]


async def test_several_probes_and_the_first_success_closes(autojump_clock):
    """probes=2 lets two callers through in half-open; one success closes the breaker."""
    b, _ = new_runtime(failure_rate=1.0, window=1, min_calls=1, cooldown=1, probes=2)
    b.record(False, probe=False)
    assert [True, True] == [await b.admit(), await b.admit()]
    b.record(True, probe=True)
    assert "closed" == b.state
    b.record(False, probe=True)  # the other probe's late outcome changes nothing
    assert "closed" == b.state
    assert await b.admit() is False


async def test_when_open_fail_raises_circuit_open_instead_of_waiting(autojump_clock):
    """when_open="fail": admit() raises CircuitOpen while open and while probes are busy."""
    b, _ = new_runtime(failure_rate=1.0, window=1, min_calls=1, cooldown=10, when_open="fail")
    b.record(False, probe=False)
    with pytest.raises(CircuitOpen, match="circuit breaker is open"):
        await b.admit()
    await trio.sleep(10)
    assert await b.admit() is True
    with pytest.raises(CircuitOpen, match="half-open and its probes are busy"):
        await b.admit()
    assert 10.0 == trio.current_time()


async def test_released_probe_lets_another_through(autojump_clock):
    """A probe cancelled without an outcome frees its slot for the next caller."""
    b, _ = new_runtime(failure_rate=1.0, window=1, min_calls=1, cooldown=0, when_open="fail")
    b.record(False, probe=False)
    assert await b.admit() is True
    b.release_probe()
    assert await b.admit() is True
    assert "half_open" == b.state


async def test_outcomes_while_open_are_ignored(autojump_clock):
    """Late outcomes of calls that started before the breaker opened change nothing."""
    b, changes = new_runtime(failure_rate=1.0, window=1, min_calls=1, cooldown=10)
    b.record(False, probe=False)
    b.record(True, probe=False)
    b.record(False, probe=False)
    assert "open" == b.state
    assert 1 == len(changes)


# -- through real runs -----------------------------------------------------------------------


def service(calls, down_until, duration=1.0):
    """A stage function for a service that fails until ``down_until``; records calls."""

    async def call(x):
        calls.append((x, trio.current_time()))
        await trio.sleep(duration)
        if trio.current_time() <= down_until:
            raise ConnectionError(f"down at {trio.current_time():g}")
        return x

    return call


async def test_run_opens_holds_probes_and_closes_at_exact_times(autojump_clock):
    """Three failures open the breaker at t=3; items wait out the cooldown (no call),
    the probe at t=13 succeeds, the breaker closes and the rest flow."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=3, min_calls=3, cooldown=10)
    down = stage(name="down", errors="collect", breaker=breaker)(service(calls, down_until=3))
    with capture_logs() as logs:
        result = await Pipeline(down).arun(range(6))
    assert [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)] == calls
    assert [3, 4, 5] == result.outputs
    assert [0, 1, 2] == [e.item for e in result.errors]
    changes = [
        (e["stage"], e["old"], e["new"]) for e in logs if e["event"] == "breaker_state_changed"
    ]
    assert [
        ("down", "closed", "open"),
        ("down", "open", "half_open"),
        ("down", "half_open", "closed"),
    ] == changes
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "breaker_state_changed")
    s = result.stats["down"]
    assert ("closed", 6, 3, 3) == (s.breaker_state, s.items_in, s.ok, s.failed)
    assert 16.0 == result.elapsed


async def test_failed_probe_waits_another_full_cooldown(autojump_clock):
    """A probe that fails reopens the breaker; the next probe comes a cooldown later."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10)
    down = stage(name="down", errors="collect", breaker=breaker)(service(calls, down_until=15))
    result = await Pipeline(down).arun(range(4))
    # Open at 2; probe 12→13 fails (reopen at 13); probe 23→24 succeeds; item 3 at 24.
    assert [(0, 0.0), (1, 1.0), (2, 12.0), (3, 23.0)] == calls
    assert [3] == result.outputs
    assert [0, 1, 2] == [e.item for e in result.errors]
    assert 24.0 == result.elapsed


async def test_hold_is_backpressure_and_loses_nothing(autojump_clock):
    """While open, held items fill the buffers and the source stops being pulled; once
    closed every item goes through: none is lost."""
    pulled = []
    calls = []

    def source():
        for i in range(30):
            pulled.append((i, trio.current_time()))
            yield i

    breaker = CircuitBreaker(failure_rate=1.0, window=1, min_calls=1, cooldown=100)
    down = stage(name="down", workers=2, buffer=2, errors="skip", breaker=breaker)(
        service(calls, down_until=1)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Pipeline(down).arun, source())
        await trio.sleep(50)  # mid-cooldown
        # 2 failed, 2 held by the workers, 2 in the buffer, 1 in the source's send.
        assert 7 == len(pulled)
        assert 2 == len(calls)
    assert 30 == len(pulled)
    assert list(range(30)) == sorted(x for x, _ in calls)


async def test_probes_limit_concurrency_in_half_open(autojump_clock):
    """probes=2 with 4 workers: two items are tried in half-open, the others wait until
    a probe succeeds and closes the breaker."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=1, min_calls=1, cooldown=10, probes=2)

    @stage(workers=4, errors="collect", breaker=breaker)
    async def call(x):
        calls.append((x, trio.current_time()))
        await trio.sleep(1 if x < 4 else 2)
        if trio.current_time() <= 1:
            raise ConnectionError("down")
        return x

    result = await Pipeline(call).arun(range(10))
    at = {}
    for x, t in calls:
        at.setdefault(t, []).append(x)
    # 0-3 fail at 1 (the first opens it); 2 probes at 11 succeed at 13; then 4 at once.
    assert {0.0: 4, 11.0: 2, 13.0: 4} == {t: len(xs) for t, xs in at.items()}
    assert [0, 1, 2, 3] == sorted(at[0.0])
    assert list(range(4, 10)) == sorted(result.outputs)
    assert 15.0 == result.elapsed


async def test_min_calls_protects_a_short_run(autojump_clock):
    """Fewer calls than min_calls never open the breaker, even if they all fail."""
    calls = []
    breaker = CircuitBreaker(failure_rate=0.5, window=10, min_calls=10, cooldown=10)
    down = stage(name="down", errors="collect", breaker=breaker)(service(calls, down_until=100))
    result = await Pipeline(down).arun(range(9))
    assert 9 == len(result.errors)
    assert "closed" == result.stats["down"].breaker_state
    assert 9.0 == result.elapsed


async def test_when_open_fail_refuses_items_with_circuit_open(autojump_clock):
    """when_open="fail": refused items fail at once with CircuitOpen under the stage's
    policy, reach the dead letter, and the function is not called for them."""
    calls = []
    letters = []
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10, when_open="fail")

    async def source():
        for i in range(14):
            yield i
            await trio.sleep(1)

    down = stage(name="down", errors="collect", breaker=breaker, dead_letter=letters.append)(
        service(calls, down_until=2, duration=0.5)
    )
    result = await Pipeline(down).arun(source())
    # Item i arrives at t=i. 0 and 1 fail, opening the breaker at 1.5 until 11.5; 2..11
    # are refused without a call; 12 is the probe and succeeds; 13 flows.
    assert [(0, 0.0), (1, 1.0), (12, 12.0), (13, 13.0)] == calls
    assert [12, 13] == result.outputs
    assert list(range(12)) == [e.item for e in result.errors]
    assert list(range(12)) == [f.item for f in letters]
    refused = result.errors[2:]
    for e in refused:
        assert isinstance(e.__cause__, CircuitOpen)
        assert 1 == e.attempts
        assert f"stage 'down' failed on item {e.item}: CircuitOpen: circuit breaker is open" == str(
            e
        )
    assert all(isinstance(f.error, CircuitOpen) for f in letters[2:])
    s = result.stats["down"]
    assert (14, 2, 12, "closed") == (s.items_in, s.ok, s.failed, s.breaker_state)


async def test_when_open_fail_with_cooldown_reaches_a_probe(autojump_clock):
    """After the cooldown the next item is the probe; success closes the breaker."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=5, when_open="fail")

    async def source():
        for i in range(10):
            yield i
            await trio.sleep(1)

    down = stage(name="down", errors="skip", breaker=breaker)(
        service(calls, down_until=2, duration=0.5)
    )
    result = await Pipeline(down).arun(source())
    # Items at t=0..9; 0 and 1 fail, opening the breaker at t=1.5; 2..6 are refused
    # (t=2..6 < 6.5); 7 at t=7 is the probe and succeeds; 8 and 9 flow.
    assert [0, 1, 7, 8, 9] == [x for x, _ in calls]
    assert [7, 8, 9] == result.outputs
    assert 7 == result.stats["down"].failed
    assert "closed" == result.stats["down"].breaker_state


async def test_open_breaker_under_fail_fast_stops_the_run_with_circuit_open(autojump_clock):
    """when_open="fail" with the default policy: the first refused item fails the run.
    CircuitOpen is not retried: a retry that finds the breaker open fails at once."""
    breaker = CircuitBreaker(failure_rate=1.0, window=1, min_calls=1, cooldown=10, when_open="fail")

    @stage(workers=2, breaker=breaker, retries=Retry(attempts=3, backoff=1))
    async def down(x):
        await trio.sleep(1)
        raise ConnectionError("down")

    with pytest.raises(StageError) as info:
        await Pipeline(down).arun(range(5))
    # 0 and 1 fail at t=1 (opening the breaker); their retries at t=2 are refused.
    err = info.value
    assert isinstance(err.__cause__, CircuitOpen)
    assert (2, True) == (err.attempts, err.item in (0, 1))
    assert 2.0 == trio.current_time()


async def test_hold_breaker_holds_retries_through_the_cooldown(autojump_clock):
    """A retry that finds the breaker open waits for the half-open probe slot."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=1, min_calls=1, cooldown=10)
    flaky = stage(
        name="flaky", breaker=breaker, retries=Retry(attempts=2, backoff=1), errors="collect"
    )(service(calls, down_until=5))
    result = await Pipeline(flaky).arun(["a"])
    # 0→1 fails and opens (until 11); retry after 1 s waits for the probe at 11; it
    # succeeds at 12.
    assert [("a", 0.0), ("a", 11.0)] == calls
    assert ["a"] == result.outputs
    assert 1 == result.stats["flaky"].retried


async def test_stages_sharing_a_breaker_share_its_state(autojump_clock):
    """One CircuitBreaker object on two stages is one breaker: failures in the first
    open it for the second."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10, when_open="fail")

    @stage(errors="embed", breaker=breaker)
    async def first(x):
        calls.append(("first", x))
        raise ConnectionError("shared backend down")

    @stage(errors="embed", breaker=breaker)
    async def second(x):
        calls.append(("second", x))
        return x

    @stage(errors="embed")
    async def feed(x):
        return x

    result = await Pipeline(first | feed | second.with_options(name="second")).arun(range(4))
    assert [("first", 0), ("first", 1)] == calls
    assert all(isinstance(o, Failed) for o in result.outputs)
    assert "open" == result.stats["first"].breaker_state == result.stats["second"].breaker_state


async def test_breaker_state_is_visible_in_live_stats(autojump_clock):
    """stats()[stage].breaker_state follows the breaker while the run goes on."""
    breaker = CircuitBreaker(failure_rate=1.0, window=1, min_calls=1, cooldown=10)
    gate = trio.Event()

    @stage(errors="skip", breaker=breaker)
    async def down(x):
        if x == 0:
            raise ConnectionError("down")
        await gate.wait()
        return x

    seen = []
    async with Pipeline(down).stream(range(3)) as outputs:
        await trio.sleep(1)
        seen.append(outputs.stats()["down"].breaker_state)  # open, until t=10
        await trio.sleep(10)
        seen.append(outputs.stats()["down"].breaker_state)  # probe 1 is out
        gate.set()
        got = [out async for out in outputs]
    seen.append(outputs.result.stats["down"].breaker_state)
    assert ["open", "half_open", "closed"] == seen
    assert [1, 2] == got


async def test_without_a_breaker_the_state_is_none():
    """A stage with no breaker reports breaker_state None."""

    @stage
    async def plain(x):
        return x

    assert (await Pipeline(plain).arun([1])).stats["plain"].breaker_state is None


async def test_breaker_state_does_not_carry_over_between_runs(autojump_clock):
    """Each run starts with a closed breaker, even if the last run left it open."""
    calls = []
    breaker = CircuitBreaker(failure_rate=1.0, window=1, min_calls=1, cooldown=1000)
    down = stage(name="down", errors="skip", breaker=breaker)(service(calls, down_until=10**9))
    pipeline = Pipeline(down)
    first = await pipeline.arun([1])
    assert "open" == first.stats["down"].breaker_state
    start = trio.current_time()
    await pipeline.arun([2])
    assert (2, start) == calls[-1]
