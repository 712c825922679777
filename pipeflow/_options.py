"""Stage options: one frozen value object, validated when the stage is declared.

:class:`StageOptions` is the one definition of what a stage option is: its fields, their
defaults and their validators. :class:`StageKeywords` is the same set as keyword types,
for ``**options: Unpack[StageKeywords]`` in ``Stage.__init__`` and ``stage()`` (so mypy
checks option names and types at call sites); a test keeps the two in step.

Every check names the stage, the option and the value the user gave, so a typo fails at
decoration time with a message that points at the line to fix, not deep inside a run.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

import attrs

from ._policies import CircuitBreaker, Retry

if TYPE_CHECKING:
    from ._stage import Stage

ErrorPolicy = Literal["fail_fast", "collect", "skip", "embed"]
RunIn = Literal["task", "thread", "process"]
#: What the stage's function is, decided once from the function itself.
Kind = Literal["async", "asyncgen", "sync", "syncgen"]

ERROR_POLICIES: tuple[str, ...] = get_args(ErrorPolicy)
RUN_IN_CHOICES: tuple[str, ...] = get_args(RunIn)

#: The buffer of the first stage after an acking source, unless ``buffer=`` is given: such
#: a source has its items in hand already (a page read from a queue) and hands them over
#: many at a time, where a slot per worker would let in a few per scheduler round. The
#: source is told of the extra room (``capacity``), and keeps that many more un-acked.
#: Two of the runner's chunks (``pipeflow._run.edge.CHUNK``, 32).
SOURCE_BUFFER = 64


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


# -- validators: each names the stage (already set: attrs runs validators after every
# field is assigned), the option and the value. Checks that involve two options sit on
# the later one, so the order of the messages is the order of the fields.


def check_name(name: object, owner: str | None = None) -> None:
    """Refuse a ``name=`` that cannot name a stage. The error names ``owner`` (the
    function or class it was given to) when known, as the stage has no name to be
    named by."""
    if not isinstance(name, str) or not name.strip():
        who = f"stage {owner!r}: option" if owner is not None else "stage option"
        raise TypeError(f"{who} name= must be a non-empty str, got {name!r}")


def _check_name(opts: StageOptions, a: attrs.Attribute[Any], name: object) -> None:
    check_name(name)


def _check_workers(opts: StageOptions, a: attrs.Attribute[Any], workers: object) -> None:
    stage = opts.name
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


def _check_buffer(opts: StageOptions, a: attrs.Attribute[Any], buffer: object) -> None:
    if buffer is not None:
        if not _is_int(buffer):
            _fail(opts.name, "buffer", "an int >= 0 (or None for the default)", buffer, TypeError)
        assert isinstance(buffer, int)
        if buffer < 0:
            _fail(opts.name, "buffer", "an int >= 0 (or None for the default)", buffer, ValueError)


def _check_ordered(opts: StageOptions, a: attrs.Attribute[Any], ordered: object) -> None:
    if not isinstance(ordered, bool):
        _fail(opts.name, "ordered", "True or False", ordered, TypeError)


def _check_key(opts: StageOptions, a: attrs.Attribute[Any], key: object) -> None:
    if key is not None and not callable(key):
        _fail(opts.name, "key", "a callable item -> key", key, TypeError)


def _check_seconds(opts: StageOptions, a: attrs.Attribute[Any], value: object) -> None:
    _check_positive_number(opts.name, a.name, value, allow_none=True)


def _to_retry(retries: Any) -> Any:
    """``retries=3`` -> ``Retry(attempts=3)``, ``0`` -> None; anything else as it is,
    for the validator to judge (a negative count, a string)."""
    if _is_int(retries) and retries >= 0:
        return Retry(attempts=retries) if retries else None
    return retries


def _check_retries(opts: StageOptions, a: attrs.Attribute[Any], retries: object) -> None:
    if retries is None or isinstance(retries, Retry):
        return
    exc = ValueError if _is_int(retries) else TypeError  # an int here is negative
    _fail(opts.name, "retries", "an int >= 0 or a pipeflow.Retry", retries, exc)


def _check_errors(opts: StageOptions, a: attrs.Attribute[Any], errors: object) -> None:
    if errors not in ERROR_POLICIES:
        choices = ", ".join(repr(p) for p in ERROR_POLICIES)
        _fail(opts.name, "errors", f"one of {choices}", errors, ValueError)


def _check_max_failures(opts: StageOptions, a: attrs.Attribute[Any], value: object) -> None:
    stage = opts.name
    if value is None:
        return
    if _is_int(value):
        assert isinstance(value, int)
        if value < 0:
            _fail(stage, "max_failures", "an int >= 0 or a fraction", value, ValueError)
    elif isinstance(value, float):
        if not 0.0 < value < 1.0:
            _fail(stage, "max_failures", "a fraction between 0 and 1", value, ValueError)
    else:
        _fail(stage, "max_failures", "an int >= 0 or a fraction", value, TypeError)
    if opts.errors in ("fail_fast", "embed"):
        expected = 'used with errors="collect" or errors="skip"'
        _fail(stage, "max_failures", expected, value, ValueError)


def _check_rate(opts: StageOptions, a: attrs.Attribute[Any], rate: object) -> None:
    if rate is not None:
        if not _is_number(rate):
            _fail(opts.name, "rate", "a number of items per second > 0", rate, TypeError)
        assert isinstance(rate, int | float)
        if not (rate > 0 and math.isfinite(rate)):
            expected = "a finite number of items per second > 0"
            _fail(opts.name, "rate", expected, rate, ValueError)


def _check_burst(opts: StageOptions, a: attrs.Attribute[Any], burst: object) -> None:
    if burst is not None:
        if not _is_int(burst):
            _fail(opts.name, "burst", "an int >= 1", burst, TypeError)
        assert isinstance(burst, int)
        if burst < 1:
            _fail(opts.name, "burst", "an int >= 1", burst, ValueError)
        if opts.rate is None:
            _fail(opts.name, "burst", "used together with rate=", burst, ValueError)


def _check_batch(opts: StageOptions, a: attrs.Attribute[Any], batch: object) -> None:
    if batch is not None:
        if not _is_int(batch):
            _fail(opts.name, "batch", "an int >= 1", batch, TypeError)
        assert isinstance(batch, int)
        if batch < 1:
            _fail(opts.name, "batch", "an int >= 1", batch, ValueError)


def _check_batch_timeout(opts: StageOptions, a: attrs.Attribute[Any], value: object) -> None:
    stage = opts.name
    _check_positive_number(stage, "batch_timeout", value, allow_none=True)
    if value is not None and opts.batch is None:
        _fail(stage, "batch_timeout", "used together with batch=", value, ValueError)
    # key= against workers= and batch=, once all three are known to be valid.
    if opts.key is not None and isinstance(opts.workers, tuple):
        msg = (
            f"stage {stage!r}: option key= needs a fixed number of workers (each key has "
            f"its own worker), got workers={opts.workers!r}"
        )
        raise ValueError(msg)
    if opts.key is not None and opts.batch is not None:
        raise ValueError(f"stage {stage!r}: options key= and batch= cannot be combined")


def _check_run_in(opts: StageOptions, a: attrs.Attribute[Any], run_in: object) -> None:
    stage = opts.name
    if run_in not in RUN_IN_CHOICES:
        choices = ", ".join(repr(r) for r in RUN_IN_CHOICES)
        _fail(stage, "run_in", f"one of {choices}", run_in, ValueError)
    if opts.kind in ("async", "asyncgen") and run_in != "task":
        msg = (
            f"stage {stage!r}: option run_in={run_in!r} needs a plain (sync) function; "
            f"an async function always runs as a Trio task"
        )
        raise TypeError(msg)
    if run_in == "process" and opts.kind == "syncgen":
        msg = f"stage {stage!r}: option run_in='process' does not take a generator function"
        raise TypeError(msg)


def _check_resource(opts: StageOptions, a: attrs.Attribute[Any], resource: object) -> None:
    if resource is not None and not callable(resource):
        expected = "a callable returning an async context manager"
        _fail(opts.name, "resource", expected, resource, TypeError)
    if resource is not None and opts.run_in == "process":
        msg = f"stage {opts.name!r}: option resource= cannot be used with run_in='process'"
        raise ValueError(msg)


def _check_breaker(opts: StageOptions, a: attrs.Attribute[Any], breaker: object) -> None:
    if breaker is not None and not isinstance(breaker, CircuitBreaker):
        _fail(opts.name, "breaker", "a pipeflow.CircuitBreaker", breaker, TypeError)


def _check_dead_letter(opts: StageOptions, a: attrs.Attribute[Any], sink: object) -> None:
    # A Stage is the one thing that carries StageOptions: no import of the layer above.
    is_stage = isinstance(getattr(sink, "options", None), StageOptions)
    if sink is not None and not callable(sink) and not is_stage:
        _fail(opts.name, "dead_letter", "a callable or a Stage", sink, TypeError)


@attrs.frozen(kw_only=True)
class StageOptions:
    """The validated options of one stage: the one list of stage options.

    Build with :func:`make_options` (which picks ``run_in`` from the kind of function)
    and change with :meth:`evolve`; both validate every option again.
    """

    name: str = attrs.field(validator=_check_name)
    kind: Kind
    workers: int | tuple[int, int] = attrs.field(default=1, validator=_check_workers)
    buffer: int | None = attrs.field(default=None, validator=_check_buffer)
    ordered: bool = attrs.field(default=False, validator=_check_ordered)
    key: Callable[[Any], Any] | None = attrs.field(default=None, validator=_check_key)
    timeout: float | None = attrs.field(default=None, validator=_check_seconds)
    stall_after: float | None = attrs.field(default=None, validator=_check_seconds)
    retries: Retry | None = attrs.field(default=None, converter=_to_retry, validator=_check_retries)
    errors: ErrorPolicy = attrs.field(default="fail_fast", validator=_check_errors)
    max_failures: int | float | None = attrs.field(default=None, validator=_check_max_failures)
    rate: float | None = attrs.field(default=None, validator=_check_rate)
    burst: int | None = attrs.field(default=None, validator=_check_burst)
    batch: int | None = attrs.field(default=None, validator=_check_batch)
    batch_timeout: float | None = attrs.field(default=None, validator=_check_batch_timeout)
    run_in: RunIn = attrs.field(default="task", validator=_check_run_in)
    resource: Callable[[], Any] | None = attrs.field(default=None, validator=_check_resource)
    breaker: CircuitBreaker | None = attrs.field(default=None, validator=_check_breaker)
    dead_letter: Any = attrs.field(default=None, validator=_check_dead_letter)

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

    def input_buffer(self, *, after_acking_source: bool = False) -> int:
        """The input channel's capacity a run gives the stage: :attr:`buffer_size`; for
        the first stage after an acking source (which hands over pages of entries) with
        no ``buffer=`` set, at least :data:`SOURCE_BUFFER`."""
        if after_acking_source and self.buffer is None:
            return max(self.buffer_size, SOURCE_BUFFER)
        return self.buffer_size

    def evolve(self, **changes: Any) -> StageOptions:
        """A copy with some options changed, every option validated again."""
        _check_known(self.name, changes)
        if "run_in" in changes and changes["run_in"] is None:
            changes["run_in"] = _default_run_in(self.kind)
        return attrs.evolve(self, **changes)


class StageKeywords(TypedDict, total=False):
    """The keyword arguments of ``Stage.__init__``, ``stage()`` and ``with_options``:
    :class:`StageOptions`' fields (but ``kind``) with the types a user passes."""

    workers: int | tuple[int, int]
    buffer: int | None
    name: str | None
    ordered: bool
    key: Callable[[Any], Any] | None
    timeout: float | None
    stall_after: float | None
    retries: int | Retry
    errors: ErrorPolicy
    max_failures: int | float | None
    rate: float | None
    burst: int | None
    batch: int | None
    batch_timeout: float | None
    run_in: RunIn | None
    resource: Callable[[], Any] | None
    breaker: CircuitBreaker | None
    dead_letter: Callable[[Any], Any] | Stage[Any, Any] | None


#: The option names a user may pass, in the order of the fields.
OPTION_NAMES: tuple[str, ...] = tuple(
    f.name for f in attrs.fields(StageOptions) if f.name != "kind"
)


def _default_run_in(kind: Kind) -> RunIn:
    return "task" if kind in ("async", "asyncgen") else "thread"


def _check_known(stage: object, options: dict[str, Any]) -> None:
    """Refuse an unknown option, naming the stage, the option and the closest valid one."""
    unknown = [k for k in options if k not in OPTION_NAMES]
    if unknown:
        raise TypeError(unknown_options_message(stage, unknown, OPTION_NAMES))


def unknown_options_message(stage: object, unknown: Sequence[str], known: Sequence[str]) -> str:
    """What to say about keywords ``unknown`` given to ``stage`` (its name, if known),
    which takes ``known``: each with the closest valid one, or the list of them."""
    who = f"stage {stage!r}" if isinstance(stage, str) else "stage"
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}=?" if close else ""
        parts.append((name, hint))
    if len(parts) == 1:
        name, hint = parts[0]
        msg = f"{who}: unknown option {name}="
        msg += f"; {hint}" if hint else f"; the options are {', '.join(known)}"
    else:
        listed = ", ".join(f"{n}= ({h})" if h else f"{n}=" for n, h in parts)
        msg = f"{who}: unknown options {listed}; the options are {', '.join(known)}"
    return msg


def make_options(*, kind: Kind, **options: Any) -> StageOptions:
    """Validate every option and return them frozen; raise naming stage, option and value.

    ``options`` are :class:`StageKeywords`; ``run_in`` left out (or None) follows the kind
    of function: a Trio task for ``async def``, a worker thread for a plain ``def``.
    """
    _check_known(options.get("name"), options)
    if options.get("run_in") is None:
        options["run_in"] = _default_run_in(kind)
    return StageOptions(kind=kind, **options)
