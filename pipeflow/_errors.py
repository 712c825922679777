"""The exceptions and the failure value users see."""

from __future__ import annotations

import reprlib
from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = 6
_repr.maxdict = 6


def short_repr(item: object) -> str:
    """A repr short enough for an error message or a log line."""
    return _repr.repr(item)


class StageError(Exception):
    """An item failed in a stage.

    ``stage`` is the stage's name, ``item`` the input it failed on, ``attempts`` how many
    times the function was called for it; ``__cause__`` is the original exception, with
    its traceback. When ``run``/``arun`` raise it, ``result`` holds the stopped run's
    :class:`RunResult` (statistics up to the failure).
    """

    #: The :class:`RunResult` of the run this error stopped, when raised by
    #: ``run``/``arun`` (None for errors collected in ``RunResult.errors``).
    result: Any = None

    def __init__(self, stage: str, item: object, error: BaseException, *, attempts: int = 1):
        self.stage = stage
        self.item = item
        self.attempts = attempts
        self.error = error
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(
            f"stage {stage!r} failed on item {short_repr(item)}{tries}: "
            f"{type(error).__name__}: {error}"
        )
        self.__cause__ = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_stage_error, (self.stage, self.item, self.error, self.attempts))


def _rebuild_stage_error(
    stage: str, item: object, error: BaseException, attempts: int
) -> StageError:
    return StageError(stage, item, error, attempts=attempts)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM, after letting in-flight items finish.

    A ``KeyboardInterrupt``, so an unhandled one stops a program as Ctrl+C does;
    ``signal`` is the signal number and ``result`` the run's :class:`RunResult` so far.
    """

    def __init__(self, signum: int, result: Any) -> None:
        import signal

        self.signal = signum
        self.result = result
        super().__init__(f"run stopped by {signal.Signals(signum).name}")


class PipelineFull(Exception):
    """``send_nowait`` found the pipeline's entry full (the reject strategy: answer 429)."""


class PipelineClosed(Exception):
    """``send``, ``send_nowait`` or ``offer`` on a :class:`~pipeflow.Flow` that takes no
    more input: its run has stopped (a failure, a cancellation) or its input was closed.
    The message says which."""


class CircuitOpen(Exception):
    """The stage's circuit breaker is open and the stage was told to fail items at once."""


@attrs.frozen
class Failed(Generic[T]):
    """A failure travelling as a value (``errors="embed"``) or handed to a dead-letter sink.

    Later stages pass it on untouched, so it reaches the outputs where the item would have.
    """

    item: T
    error: BaseException
    stage: str
    attempts: int = attrs.field(default=1, kw_only=True)
