"""Property test: random fault injection over random stage configurations (workers,
autoscaling, ordering, keyed routing, policies, retries, timeouts, breakers, dead letters).

Whatever the policies, retries, timeouts, breakers and dead letters, every input is
accounted for exactly once: it leaves as an output (possibly a ``Failed``), is collected
in ``result.errors``, is skipped (logged), or is filtered by a generator stage; every
failure reaches the dead-letter sink when the failing stage has one; per-stage counts add
up. Under ``fail_fast`` the run raises ``StageError`` for an item that was meant to fail
there. Faults depend only on (item, stage, attempt), so the fate of each item is known
in advance; only an open breaker with ``when_open="fail"`` may change it (to a
``CircuitOpen`` failure in that stage).
"""

from __future__ import annotations

import ast
import functools
import math

import structlog
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from pipeflow import CircuitBreaker, CircuitOpen, Failed, Pipeline, Retry, StageError, stage

#: What an item meets in a stage, per attempt: ok; always a retryable error; always a
#: non-retryable one (for Retry(on=...)); retryable errors on the first 1 or 2 attempts;
#: a hang past the timeout (always, or on the first attempt only); filtered by a
#: generator stage.
PATTERNS = ["ok", "ok", "ok", "raise", "fatal", "flaky1", "flaky2", "hang", "hang1", "filter"]
GENERATORS = ("asyncgen", "syncgen")
HANG = "hang"
ERROR_TYPES = {t.__name__: t for t in (ConnectionError, ValueError, TimeoutError, CircuitOpen)}


def outcome(pattern, attempt, can_hang):
    """What attempt number ``attempt`` does: None (succeeds), HANG, or an exception type."""
    if pattern in ("ok", "filter"):
        return None
    if pattern == "raise":
        return ConnectionError
    if pattern == "fatal":
        return ValueError
    if pattern in ("flaky1", "flaky2"):
        return ConnectionError if attempt <= int(pattern[-1]) else None
    # hang, hang1: a hang only where a timeout ends it and the call can sleep.
    if pattern == "hang" or attempt == 1:
        return HANG if can_hang else ConnectionError
    return None


retry_specs = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "attempts": st.integers(1, 2),
            "backoff": st.sampled_from([0, 0.5, 1]),
            "only_transient": st.booleans(),
        }
    ),
)

stage_specs = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["async", "asyncgen", "inline", "thread", "syncgen"]),
        "workers": st.sampled_from([1, 2, 3, (1, 3)]),
        "ordered": st.booleans(),
        "key": st.booleans(),
        "errors": st.sampled_from(["fail_fast", "collect", "collect", "skip", "embed", "embed"]),
        "retries": retry_specs,
        "timeout": st.sampled_from([None, 3, 3]),
        "breaker": st.sampled_from([None, None, "hold", "fail"]),
        "dead_letter": st.sampled_from([None, None, "sync", "async"]),
        "patterns": st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=6),
        "delay": st.sampled_from([0, 0.5, 1]),
    }
)


class Spec:
    """One stage's random configuration, and the fate it predicts for each item."""

    def __init__(self, i, raw):
        self.i = i
        self.name = f"s{i}"
        self.kind = raw["kind"]
        self.threaded = self.kind in ("thread", "syncgen")
        # Under autojump the clock jumps while Trio waits for a thread, so a thread
        # call would always "time out": no timeouts on thread stages here.
        self.timeout = None if self.threaded else raw["timeout"]
        self.can_hang = self.timeout is not None and self.kind in ("async", "asyncgen")
        self.errors = raw["errors"]
        self.patterns = raw["patterns"]
        self.delay = raw["delay"]
        r = raw["retries"]
        self.retry = None
        if r is not None:
            on = (ConnectionError, TimeoutError) if r["only_transient"] else (Exception,)
            self.retry = Retry(attempts=r["attempts"], backoff=r["backoff"], on=on)
        self.breaker = raw["breaker"]
        self.dead_letter = raw["dead_letter"]
        self.workers = raw["workers"]
        self.ordered = raw["ordered"]
        self.key = raw["key"]

    def pattern(self, x):
        return self.patterns[(7 * x + 3 * self.i) % len(self.patterns)]

    def predict(self, x):
        """("ok", retries) | ("filtered", retries) | ("failed", error type, attempts)."""
        pattern = self.pattern(x)
        attempt = 0
        while True:
            attempt += 1
            result = outcome(pattern, attempt, self.can_hang)
            if result is None:
                filtered = pattern == "filter" and self.kind in GENERATORS
                return ("filtered" if filtered else "ok", attempt - 1)
            error = TimeoutError if result is HANG else result
            retry = self.retry
            if retry is not None and attempt <= retry.attempts and retry.retryable(error()):
                continue
            return ("failed", error, attempt)


def build_stage(spec, calls, filtered_seen, letters):
    """The stage for ``spec``: items are (x, path); each stage appends its index."""
    i = spec.i

    def attempt_of(item):
        key = (i, item[0])
        calls[key] = calls.get(key, 0) + 1
        return calls[key]

    def sync_step(item):
        result = outcome(spec.pattern(item[0]), attempt_of(item), can_hang=False)
        if result is not None:
            raise result(f"{spec.name} on {item[0]}")
        return (item[0], (*item[1], i))

    opts = {
        "name": spec.name,
        "workers": spec.workers,
        "ordered": spec.ordered,
        "errors": spec.errors,
        "timeout": spec.timeout,
        "retries": spec.retry or 0,
    }
    if spec.key and not isinstance(spec.workers, tuple):  # keyed stages have fixed pools
        opts["key"] = lambda item: item[0] % 2
    if spec.breaker is not None:
        opts["breaker"] = CircuitBreaker(
            failure_rate=0.5, window=4, min_calls=2, cooldown=5, when_open=spec.breaker
        )
    if spec.dead_letter == "sync":
        opts["dead_letter"] = letters.append
    elif spec.dead_letter == "async":

        async def sink(failed):
            await trio.sleep(0.25)
            letters.append(failed)

        opts["dead_letter"] = sink

    if spec.kind == "async":

        async def fn(item):
            result = outcome(spec.pattern(item[0]), attempt_of(item), spec.can_hang)
            await trio.sleep(spec.delay * (item[0] % 3))
            if result is HANG:
                await trio.sleep(1000)
            if result is not None:
                raise result(f"{spec.name} on {item[0]}")
            return (item[0], (*item[1], i))

    elif spec.kind == "asyncgen":

        async def fn(item):
            result = outcome(spec.pattern(item[0]), attempt_of(item), spec.can_hang)
            await trio.sleep(spec.delay * (item[0] % 3))
            if spec.pattern(item[0]) == "filter":
                filtered_seen.append((i, item[0]))
                return
            # A failing attempt yields first: its partial output must be discarded.
            yield (item[0], (*item[1], i))
            if result is HANG:
                await trio.sleep(1000)
            if result is not None:
                raise result(f"{spec.name} on {item[0]}")

    elif spec.kind == "syncgen":

        def fn(item):
            if spec.pattern(item[0]) == "filter":
                filtered_seen.append((i, item[0]))
                return
            yield sync_step(item)

    else:

        def fn(item):
            return sync_step(item)

        if spec.kind == "inline":
            opts["run_in"] = "task"

    fn.__name__ = spec.name
    return stage(**opts)(fn)


def fate(specs, x):
    """The predicted end of item x: ("out",), ("filtered", i) or ("failed", i, type, n)."""
    for spec in specs:
        predicted = spec.predict(x)
        if predicted[0] == "failed":
            return ("failed", spec.i, predicted[1], predicted[2])
        if predicted[0] == "filtered":
            return ("filtered", spec.i)
    return ("out",)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    raw_specs=st.lists(stage_specs, min_size=1, max_size=3),
    n=st.integers(0, 25),
    pipeline_dead_letter=st.booleans(),
)
def test_every_input_is_accounted_for_exactly_once(raw_specs, n, pipeline_dead_letter):
    """Random faults (errors, hangs past the timeout) over random configurations: each
    input ends in exactly one place, every failure reaches its dead letter, counts add up."""
    specs = [Spec(i, raw) for i, raw in enumerate(raw_specs)]
    calls: dict[tuple[int, int], int] = {}
    filtered_seen: list[tuple[int, int]] = []
    letters: list[Failed] = []
    pipeline_letters: list[Failed] = []
    stages = [build_stage(spec, calls, filtered_seen, letters) for spec in specs]
    chain = stages[0]
    for s in stages[1:]:
        chain = chain | s
    pipeline = Pipeline(
        chain, dead_letter=pipeline_letters.append if pipeline_dead_letter else None
    )
    has_sink = {spec.name: spec.dead_letter is not None or pipeline_dead_letter for spec in specs}
    by_name = {spec.name: spec for spec in specs}
    fail_breakers = {spec.name for spec in specs if spec.breaker == "fail"}

    # A deadlock fails after a million virtual seconds rather than hanging. Not with
    # thread stages: while Trio waits for a thread the clock jumps to the next deadline,
    # which would be this one.
    guard = math.inf if any(spec.threaded for spec in specs) else 10**6

    async def main():
        with trio.fail_after(guard):
            return await pipeline.arun([(x, ()) for x in range(n)])

    clock = trio.testing.MockClock(autojump_threshold=0)
    raised: StageError | None = None
    try:
        with capture_logs() as logs:
            result = trio.run(main, clock=clock)
    except StageError as exc:
        raised = exc
    finally:
        structlog.reset_defaults()  # capture_logs() leaves structlog marked configured
    all_letters = letters + pipeline_letters

    def matches_prediction(stage_name, x, error_type, attempts):
        """A failure of x in that stage is the predicted one, or a CircuitOpen refusal."""
        spec = by_name[stage_name]
        if error_type is CircuitOpen:
            max_attempts = 1 + (spec.retry.attempts if spec.retry else 0)
            return stage_name in fail_breakers and 1 <= attempts <= max_attempts
        return ("failed", spec.i, error_type, attempts) == fate(specs, x)

    # Every dead letter is a real failure of a stage that has a sink (its own first).
    for f in all_letters:
        assert isinstance(f, Failed)
        assert has_sink[f.stage]
        assert f.item[1] == tuple(range(by_name[f.stage].i))
        assert matches_prediction(f.stage, f.item[0], type(f.error), f.attempts), f
    assert all(by_name[f.stage].dead_letter is not None for f in letters)
    assert all(by_name[f.stage].dead_letter is None for f in pipeline_letters)

    if raised is not None:
        # fail_fast: the reported item is one that was meant to fail in that stage.
        assert "fail_fast" == by_name[raised.stage].errors
        x = raised.item[0]
        assert matches_prediction(raised.stage, x, type(raised.__cause__), raised.attempts)
        if has_sink[raised.stage]:
            assert any(f.stage == raised.stage and f.item[0] == x for f in all_letters)
        return

    # The run completed: find where each input ended.
    places: dict[int, list[tuple]] = {x: [] for x in range(n)}
    for out in result.outputs:
        if isinstance(out, Failed):
            assert "embed" == by_name[out.stage].errors
            assert out.item[1] == tuple(range(by_name[out.stage].i))
            places[out.item[0]].append(("failed", out.stage, type(out.error), out.attempts))
        else:
            assert out[1] == tuple(range(len(specs)))
            places[out[0]].append(("out",))
    for err in result.errors:
        assert isinstance(err, StageError)
        assert "collect" == by_name[err.stage].errors
        assert err.item[1] == tuple(range(by_name[err.stage].i))
        places[err.item[0]].append(("failed", err.stage, type(err.__cause__), err.attempts))
    failure_logs = [e for e in logs if e["event"] == "stage_failed"]
    for event in failure_logs:
        if event["policy"] == "skip":
            x, path = ast.literal_eval(event["item"])
            assert path == tuple(range(by_name[event["stage"]].i))
            error_type = ERROR_TYPES[event["error"].split("(")[0]]
            places[x].append(("failed", event["stage"], error_type, event["attempts"]))
    for i, x in filtered_seen:
        places[x].append(("filtered", i))

    for x in range(n):
        assert 1 == len(places[x]), (x, places[x])
        place = places[x][0]
        if place[0] == "failed":
            _, name, error_type, attempts = place
            assert matches_prediction(name, x, error_type, attempts), (x, place)
            sent = [f for f in all_letters if f.stage == name and f.item[0] == x]
            assert (1 if has_sink[name] else 0) == len(sent), (x, place)
        else:
            # Delivered or filtered: exactly as predicted.
            assert fate(specs, x) == place, (x, place)

    # Every failure is logged once; every dead letter belongs to one of them.
    failures = sum(1 for x in range(n) if places[x][0][0] == "failed")
    assert failures == len(failure_logs)
    assert sum(
        1 for x in range(n) if places[x][0][0] == "failed" and has_sink[places[x][0][1]]
    ) == len(all_letters)

    # In input order when every stage is ordered (Failed values included).
    if all(spec.ordered for spec in specs):
        order = [o.item[0] if isinstance(o, Failed) else o[0] for o in result.outputs]
        assert sorted(order) == order

    # Per-stage counts add up, and match the prediction where nothing was refused.
    reaching = list(range(n))
    for spec in specs:
        s = result.stats[spec.name]
        assert s.items_in == s.ok + s.filtered + s.failed + s.dropped
        assert 0 == s.inflight
        assert len(reaching) == s.items_in
        if not fail_breakers:
            predicted = [spec.predict(x) for x in reaching]
            assert sum(1 for p in predicted if p[0] == "failed") == s.failed
            assert sum(1 for p in predicted if p[0] == "filtered") == s.filtered
            retried = sum(p[1] if p[0] != "failed" else p[2] - 1 for p in predicted)
            assert retried == s.retried
        reaching = [x for x in reaching if places[x][0] == ("out",) or _past(places[x][0], spec)]


def _past(place, spec):
    """Whether an item that ended at ``place`` went through ``spec`` as a live item."""
    if place[0] == "filtered":
        return place[1] > spec.i
    return int(place[1][1:]) > spec.i


def test_property_harness_predicts_a_known_case():
    """The predictor itself: a hang is a TimeoutError, retried only when allowed."""
    raw = {
        "kind": "async",
        "workers": 1,
        "ordered": False,
        "key": False,
        "errors": "collect",
        "retries": {"attempts": 2, "backoff": 0, "only_transient": True},
        "timeout": 3,
        "breaker": None,
        "dead_letter": None,
        "patterns": ["hang1", "fatal", "hang"],
        "delay": 0,
    }
    spec = Spec(0, raw)
    assert ("ok", 1) == spec.predict(0)  # hang1 → one timeout, then ok
    assert ("failed", ValueError, 1) == spec.predict(1)  # not retryable
    assert ("failed", TimeoutError, 3) == spec.predict(2)
    result = trio.run(
        functools.partial(
            Pipeline(build_stage(spec, {}, [], [])).arun, [(x, ()) for x in range(3)]
        ),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    assert [(0, (0,))] == result.outputs
    assert {(1, ValueError, 1), (2, TimeoutError, 3)} == {
        (e.item[0], type(e.__cause__), e.attempts) for e in result.errors
    }
