"""Declaring stages: kinds, plain calls, option validation, composition with ``|``."""

from __future__ import annotations

import re

import pytest

from pipeflow import Chain, CircuitBreaker, FunctionStage, Pipeline, Retry, Stage, stage


@stage
async def double(x: int) -> int:
    return x * 2


@stage(workers=3, name="inc")
def increment(x: int) -> int:
    return x + 1


@stage
async def twice(x: int):
    yield x
    yield x


@stage
def split(line: str):
    yield from line.split()


class Upper(Stage[str, str]):
    async def process(self, item: str) -> str:
        return item.upper()


async def test_decorated_async_function_stays_callable():
    """An @stage async function is still awaited like the plain function."""
    assert isinstance(double, FunctionStage)
    assert 8 == await double(4)


def test_decorated_sync_function_and_generators_stay_callable():
    """Sync functions and generators keep their plain-call behaviour."""
    assert 5 == increment(4)
    assert ["a", "b"] == list(split("a b"))
    assert double.__name__ == "double"
    assert double.__wrapped__ is not None


def test_kind_follows_the_function():
    """The stage kind and default run_in are decided by the function itself."""
    assert ("async", "task") == (double.options.kind, double.options.run_in)
    assert ("sync", "thread") == (increment.options.kind, increment.options.run_in)
    assert "asyncgen" == twice.options.kind
    assert ("syncgen", "thread") == (split.options.kind, split.options.run_in)
    assert ("async", "upper") == (Upper().options.kind, Upper().name)


def test_options_are_kept_and_defaults_are_small():
    """Options land in a frozen object; the default buffer is one slot per worker."""
    assert "inc" == increment.name
    assert 3 == increment.options.workers
    assert 3 == increment.options.buffer_size
    assert 1 == double.options.buffer_size
    assert "fail_fast" == double.options.errors
    s = stage(workers=(2, 8), buffer=0, ordered=True, timeout=1.5)(double.fn)
    assert (2, 8, 0, 8) == (
        s.options.min_workers,
        s.options.max_workers,
        s.options.buffer_size,
        s.options.max_workers,
    )


def test_class_stage_takes_options_as_keywords():
    """A Stage subclass instance takes the same options as @stage."""
    up = Upper(workers=4, name="shout", ordered=True)
    assert (4, "shout", True) == (up.options.workers, up.name, up.options.ordered)


def test_with_options_returns_a_validated_copy():
    """with_options changes some options and leaves the original alone."""
    again = double.with_options(name="double_again", workers=2)
    assert ("double", 1) == (double.name, double.options.workers)
    assert ("double_again", 2) == (again.name, again.options.workers)
    with pytest.raises(ValueError, match="workers"):
        double.with_options(workers=0)
    with pytest.raises(TypeError, match="unknown option"):
        double.with_options(wrokers=2)


async def fn(x):
    return x


BAD_OPTIONS = [
    (
        {"workers": 0},
        ValueError,
        "option workers= must be an int >= 1 or a (min, max) tuple, got 0",
    ),
    ({"workers": True}, TypeError, "workers= must be an int >= 1 or a (min, max) tuple, got True"),
    ({"workers": "8"}, TypeError, "workers= must be an int >= 1 or a (min, max) tuple, got '8'"),
    ({"workers": (4, 2)}, ValueError, "1 <= min <= max, got (4, 2)"),
    ({"workers": (1, 2, 3)}, TypeError, "got (1, 2, 3)"),
    ({"buffer": -1}, ValueError, "option buffer= must be an int >= 0"),
    ({"buffer": 1.5}, TypeError, "option buffer= must be an int >= 0"),
    ({"ordered": "yes"}, TypeError, "option ordered= must be True or False, got 'yes'"),
    ({"key": "user_id"}, TypeError, "option key= must be a callable item -> key, got 'user_id'"),
    ({"timeout": 0}, ValueError, "option timeout= must be a finite number > 0, got 0"),
    ({"timeout": "10s"}, TypeError, "option timeout= must be a number of seconds > 0, got '10s'"),
    (
        {"retries": -1},
        ValueError,
        "option retries= must be an int >= 0 or a pipeflow.Retry, got -1",
    ),
    ({"retries": 2.5}, TypeError, "option retries= must be an int >= 0 or a pipeflow.Retry"),
    (
        {"errors": "ignore"},
        ValueError,
        "option errors= must be one of 'fail_fast', 'collect', 'skip', 'embed', got 'ignore'",
    ),
    (
        {"max_failures": 3},
        ValueError,
        'option max_failures= must be used with errors="collect" or errors="skip"',
    ),
    (
        {"max_failures": 1.5, "errors": "skip"},
        ValueError,
        "max_failures= must be a fraction between 0 and 1",
    ),
    ({"rate": 0}, ValueError, "option rate= must be a finite number of items per second > 0"),
    (
        {"rate": "fast"},
        TypeError,
        "option rate= must be a number of items per second > 0, got 'fast'",
    ),
    ({"burst": 5}, ValueError, "option burst= must be used together with rate="),
    ({"batch": 0}, ValueError, "option batch= must be an int >= 1, got 0"),
    ({"batch_timeout": 0.1}, ValueError, "option batch_timeout= must be used together with batch="),
    (
        {"run_in": "fiber"},
        ValueError,
        "option run_in= must be one of 'task', 'thread', 'process', got 'fiber'",
    ),
    ({"run_in": "thread"}, TypeError, "run_in='thread' needs a plain (sync) function"),
    (
        {"resource": 42},
        TypeError,
        "option resource= must be a callable returning an async context manager",
    ),
    ({"breaker": 0.5}, TypeError, "option breaker= must be a pipeflow.CircuitBreaker, got 0.5"),
    (
        {"dead_letter": "dlq.txt"},
        TypeError,
        "option dead_letter= must be a callable or a Stage, got 'dlq.txt'",
    ),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_bad_option_fails_at_decoration_naming_stage_option_and_value(options, error, message):
    """Each wrong option raises at decoration time, naming the stage, option and value."""
    with pytest.raises(error) as info:
        stage(**options)(fn)
    assert str(info.value).startswith("stage 'fn': ")
    assert message in str(info.value)


def test_bad_option_on_a_class_stage_names_it():
    """Class stages validate the same options, named after the class."""
    with pytest.raises(ValueError, match=re.escape("stage 'upper': option workers=")):
        Upper(workers=-2)


def test_resource_needs_a_function_taking_the_resource():
    """resource= with a one-argument function is refused at decoration."""
    with pytest.raises(TypeError, match=r"must take \(item, resource\)"):
        stage(resource=lambda: None)(fn)


def test_process_stage_must_be_plain_function():
    """run_in='process' is for plain functions."""
    with pytest.raises(TypeError, match="needs a plain"):
        stage(run_in="process")(fn)


def test_retry_and_breaker_validate_their_own_arguments():
    """Policy objects check their arguments too."""
    with pytest.raises(ValueError, match="attempts= must be >= 1"):
        Retry(attempts=0)
    with pytest.raises(TypeError, match="on= must be Exception subclasses"):
        Retry(attempts=1, on=(KeyboardInterrupt,))
    with pytest.raises(ValueError, match="failure_rate="):
        CircuitBreaker(failure_rate=0)
    with pytest.raises(ValueError, match="min_calls=30 cannot exceed window=20"):
        CircuitBreaker(min_calls=30)


def test_pipe_composes_stages_and_chains():
    """stage | stage, chain | stage, stage | chain and chain | chain all make chains."""
    a, b, c, d = (double.with_options(name=n) for n in "abcd")
    assert ["a", "b"] == [s.name for s in a | b]
    assert ["a", "b", "c"] == [s.name for s in (a | b) | c]
    assert ["a", "b", "c"] == [s.name for s in a | (b | c)]
    assert ["a", "b", "c", "d"] == [s.name for s in (a | b) | (c | d)]
    assert isinstance(a | b, Chain)
    assert "Chain(a | b)" == repr(a | b)


@pytest.mark.parametrize("other", [3, "fetch", None, [double]])
def test_pipe_with_anything_else_says_what_was_given(other):
    """| with a non-stage raises TypeError naming the value and its type."""
    for expr in (lambda: double | other, lambda: other | double, lambda: (double | twice) | other):
        with pytest.raises(TypeError) as info:
            expr()
        assert f"{other!r} ({type(other).__name__})" in str(info.value)


def test_pipe_with_an_undecorated_function_hints_at_stage():
    """Forgetting @stage gets a hint."""

    async def plain(x):
        return x

    with pytest.raises(TypeError, match="decorate the function with @stage first"):
        double | plain


def test_two_stages_with_one_name_fail_when_the_pipeline_is_built():
    """Duplicate stage names are a clear error at Pipeline()."""
    with pytest.raises(ValueError, match=r"stages 1 and 2 are both named 'double'"):
        Pipeline(double | double)


def test_pipeline_refuses_what_is_not_a_stage():
    """Pipeline() with a list or a function says what it got."""
    with pytest.raises(TypeError, match=r"got \[.*\] \(list\)"):
        Pipeline([double])


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        ("Upper", "upper"),
        ("RedisStreamSink", "redis_stream_sink"),
        ("HTMLParser", "html_parser"),
        ("HTTPFetch", "http_fetch"),
    ],
)
def test_class_stage_default_name_is_snake_case(cls, name):
    """A class stage is named after its class in snake_case; a run of capitals is one word."""
    klass = type(cls, (Stage,), {"process": Upper.process})
    assert name == klass().name
