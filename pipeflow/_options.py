"""Stage options: one frozen value object, validated when the stage is declared.

Every check names the stage, the option and the value the user gave, so a typo fails at
decoration time with a message that points at the line to fix, not deep inside a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import attrs

if TYPE_CHECKING:
    from ._policies import CircuitBreaker, Retry

ErrorPolicy = Literal["fail_fast", "collect", "skip", "embed"]
RunIn = Literal["task", "thread", "process"]
#: What the stage's function is, decided once from the function itself.
Kind = Literal["async", "asyncgen", "sync", "syncgen"]

ERROR_POLICIES: tuple[str, ...] = get_args(ErrorPolicy)
RUN_IN_CHOICES: tuple[str, ...] = get_args(RunIn)


def _fail(stage: str, option: str, expected: str, value: object, exc: type[Exception]) -> None:
    msg = f"stage {stage!r}: option {option}= must be {expected}, got {value!r}"
    raise exc(msg)


def _is_int(value: object) -> bool:
    # bool is an int subclass; workers=True is a mistake, not "1 worker".
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive_number(stage: str, option: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not _is_number(value):
        _fail(stage, option, "a number of seconds > 0", value, TypeError)
    assert isinstance(value, int | float)
    if not (value > 0 and math.isfinite(value)):
        _fail(stage, option, "a finite number > 0", value, ValueError)


@attrs.frozen(kw_only=True)
class StageOptions:
    """The validated options of one stage. Build with :func:`make_options`."""

    name: str
    kind: Kind
    workers: int | tuple[int, int] = 1
    buffer: int | None = None
    ordered: bool = False
    key: Callable[[Any], Any] | None = None
    timeout: float | None = None
    retries: Retry | None = None
    errors: ErrorPolicy = "fail_fast"
    max_failures: int | float | None = None
    rate: float | None = None
    burst: int | None = None
    batch: int | None = None
    batch_timeout: float | None = None
    run_in: RunIn = "task"
    resource: Callable[[], Any] | None = None
    breaker: CircuitBreaker | None = None
    dead_letter: Any = None

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @property
    def autoscale(self) -> bool:
        return isinstance(self.workers, tuple)

    @property
    def buffer_size(self) -> int:
        """The input channel's capacity: the option, else one slot per (max) worker."""
        return self.max_workers if self.buffer is None else self.buffer


def make_options(
    *,
    name: object,
    kind: Kind,
    workers: object = 1,
    buffer: object = None,
    ordered: object = False,
    key: object = None,
    timeout: object = None,
    retries: object = 0,
    errors: object = "fail_fast",
    max_failures: object = None,
    rate: object = None,
    burst: object = None,
    batch: object = None,
    batch_timeout: object = None,
    run_in: object = None,
    resource: object = None,
    breaker: object = None,
    dead_letter: object = None,
) -> StageOptions:
    """Validate every option and return them frozen; raise naming stage, option and value."""
    from ._policies import CircuitBreaker, Retry

    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"stage option name= must be a non-empty str, got {name!r}")
    stage = name

    if _is_int(workers):
        assert isinstance(workers, int)
        if workers < 1:
            _fail(stage, "workers", "an int >= 1 or a (min, max) tuple", workers, ValueError)
    elif isinstance(workers, tuple):
        if len(workers) != 2 or not all(_is_int(w) for w in workers):
            _fail(stage, "workers", "an int >= 1 or a (min, max) tuple of ints", workers, TypeError)
        lo, hi = workers
        if not 1 <= lo <= hi:
            _fail(stage, "workers", "a (min, max) tuple with 1 <= min <= max", workers, ValueError)
    else:
        _fail(stage, "workers", "an int >= 1 or a (min, max) tuple", workers, TypeError)

    if buffer is not None:
        if not _is_int(buffer):
            _fail(stage, "buffer", "an int >= 0 (or None for the default)", buffer, TypeError)
        assert isinstance(buffer, int)
        if buffer < 0:
            _fail(stage, "buffer", "an int >= 0 (or None for the default)", buffer, ValueError)

    if not isinstance(ordered, bool):
        _fail(stage, "ordered", "True or False", ordered, TypeError)

    if key is not None and not callable(key):
        _fail(stage, "key", "a callable item -> key", key, TypeError)

    _check_positive_number(stage, "timeout", timeout, allow_none=True)

    retry: Retry | None
    if isinstance(retries, Retry):
        retry = retries
    elif _is_int(retries):
        assert isinstance(retries, int)
        if retries < 0:
            _fail(stage, "retries", "an int >= 0 or a pipeflow.Retry", retries, ValueError)
        retry = Retry(attempts=retries) if retries else None
    else:
        _fail(stage, "retries", "an int >= 0 or a pipeflow.Retry", retries, TypeError)

    if errors not in ERROR_POLICIES:
        choices = ", ".join(repr(p) for p in ERROR_POLICIES)
        _fail(stage, "errors", f"one of {choices}", errors, ValueError)

    if max_failures is not None:
        if _is_int(max_failures):
            assert isinstance(max_failures, int)
            if max_failures < 0:
                _fail(stage, "max_failures", "an int >= 0 or a fraction", max_failures, ValueError)
        elif isinstance(max_failures, float):
            if not 0.0 < max_failures < 1.0:
                _fail(stage, "max_failures", "a fraction between 0 and 1", max_failures, ValueError)
        else:
            _fail(stage, "max_failures", "an int >= 0 or a fraction", max_failures, TypeError)
        if errors in ("fail_fast", "embed"):
            _fail(
                stage,
                "max_failures",
                'used with errors="collect" or errors="skip"',
                max_failures,
                ValueError,
            )

    if rate is not None:
        if not _is_number(rate):
            _fail(stage, "rate", "a number of items per second > 0", rate, TypeError)
        assert isinstance(rate, int | float)
        if not (rate > 0 and math.isfinite(rate)):
            _fail(stage, "rate", "a finite number of items per second > 0", rate, ValueError)
    if burst is not None:
        if not _is_int(burst):
            _fail(stage, "burst", "an int >= 1", burst, TypeError)
        assert isinstance(burst, int)
        if burst < 1:
            _fail(stage, "burst", "an int >= 1", burst, ValueError)
        if rate is None:
            _fail(stage, "burst", "used together with rate=", burst, ValueError)

    if batch is not None:
        if not _is_int(batch):
            _fail(stage, "batch", "an int >= 1", batch, TypeError)
        assert isinstance(batch, int)
        if batch < 1:
            _fail(stage, "batch", "an int >= 1", batch, ValueError)
    _check_positive_number(stage, "batch_timeout", batch_timeout, allow_none=True)
    if batch_timeout is not None and batch is None:
        _fail(stage, "batch_timeout", "used together with batch=", batch_timeout, ValueError)

    if key is not None and isinstance(workers, tuple):
        msg = (
            f"stage {stage!r}: option key= needs a fixed number of workers (each key has "
            f"its own worker), got workers={workers!r}"
        )
        raise ValueError(msg)
    if key is not None and batch is not None:
        msg = f"stage {stage!r}: options key= and batch= cannot be combined"
        raise ValueError(msg)

    is_async = kind in ("async", "asyncgen")
    if run_in is None:
        run_in = "task" if is_async else "thread"
    if run_in not in RUN_IN_CHOICES:
        choices = ", ".join(repr(r) for r in RUN_IN_CHOICES)
        _fail(stage, "run_in", f"one of {choices}", run_in, ValueError)
    if is_async and run_in != "task":
        msg = (
            f"stage {stage!r}: option run_in={run_in!r} needs a plain (sync) function; "
            f"an async function always runs as a Trio task"
        )
        raise TypeError(msg)
    if run_in == "process" and kind == "syncgen":
        msg = f"stage {stage!r}: option run_in='process' does not take a generator function"
        raise TypeError(msg)

    if resource is not None and not callable(resource):
        expected = "a callable returning an async context manager"
        _fail(stage, "resource", expected, resource, TypeError)
    if resource is not None and run_in == "process":
        msg = f"stage {stage!r}: option resource= cannot be used with run_in='process'"
        raise ValueError(msg)

    if breaker is not None and not isinstance(breaker, CircuitBreaker):
        _fail(stage, "breaker", "a pipeflow.CircuitBreaker", breaker, TypeError)

    if dead_letter is not None and not callable(dead_letter):
        from ._stage import Stage

        if not isinstance(dead_letter, Stage):
            _fail(stage, "dead_letter", "a callable or a Stage", dead_letter, TypeError)

    return StageOptions(
        name=stage,
        kind=kind,
        workers=workers,  # type: ignore[arg-type]
        buffer=buffer,
        ordered=ordered,  # type: ignore[arg-type]
        key=key,  # type: ignore[arg-type]
        timeout=timeout,  # type: ignore[arg-type]
        retries=retry,
        errors=errors,  # type: ignore[arg-type]
        max_failures=max_failures,  # type: ignore[arg-type]
        rate=rate,
        burst=burst,
        batch=batch,
        batch_timeout=batch_timeout,  # type: ignore[arg-type]
        run_in=run_in,  # type: ignore[arg-type]
        resource=resource,  # type: ignore[arg-type]
        breaker=breaker,  # type: ignore[arg-type]
        dead_letter=dead_letter,
    )
