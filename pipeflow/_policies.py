"""Retry policies, the circuit breaker and the rate limiter.

The value objects (:class:`Retry`, :class:`CircuitBreaker`) are frozen configuration that
users pass as stage options; the mutable state lives in private classes created per run,
so a stage can be run many times (and under a mock clock) without carrying state over.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from typing import Literal

import attrs
import trio

from ._errors import CircuitOpen


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool)):
        raise TypeError(f"{attribute.name}= must be a number, got {value!r}")
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{attribute.name}= must be a finite number >= 0, got {value!r}")


def _positive_int(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{attribute.name}= must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{attribute.name}= must be >= 1, got {value!r}")


def _exception_types(value: object) -> tuple[type[BaseException], ...]:
    types = value if isinstance(value, tuple) else (value,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, Exception)):
            raise TypeError(f"on= must be Exception subclasses, got {value!r}")
    return types


@attrs.frozen(kw_only=True)
class Retry:
    """How a stage retries a failed item.

    ``attempts`` is the number of attempts *after* the first. The delay before attempt
    ``n + 1`` is ``backoff * multiplier ** (n - 1)``, capped at ``max_backoff``, then
    spread by ``jitter`` (0.2 means ±20%). Only exceptions that are instances of ``on``
    are retried; others fail at once. Timeouts (``TimeoutError``) count as failures.

    >>> Retry(attempts=3, backoff=0.5, on=(ConnectionError, TimeoutError)).delay(2)
    1.0
    """

    attempts: int = attrs.field(validator=_positive_int)
    backoff: float = attrs.field(default=0.1, validator=_non_negative)
    multiplier: float = attrs.field(default=2.0, validator=_non_negative)
    max_backoff: float = attrs.field(default=10.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.0, validator=_non_negative)
    on: tuple[type[BaseException], ...] = attrs.field(
        default=(Exception,), converter=_exception_types
    )

    def __attrs_post_init__(self) -> None:
        if self.jitter > 1:
            raise ValueError(f"jitter= must be between 0 and 1, got {self.jitter!r}")

    def retryable(self, error: BaseException) -> bool:
        return isinstance(error, self.on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return base


BreakerState = Literal["closed", "open", "half_open"]


@attrs.frozen(kw_only=True)
class CircuitBreaker:
    """Stop calling a failing stage, then probe before trusting it again.

    Closed: items flow; the outcomes of the last ``window`` calls are kept. Once there
    are at least ``min_calls`` of them and the share of failures reaches
    ``failure_rate``, the breaker opens. Open: the function is not called for
    ``cooldown`` seconds. With ``when_open="hold"`` (the default) workers wait, so
    backpressure reaches the source and no item is lost; with ``when_open="fail"``
    items fail at once with :class:`~pipeflow.CircuitOpen`, handled by the stage's
    ``errors=`` policy. Half-open: up to ``probes`` items are let through; a success
    closes the breaker, a failure opens it for another cooldown.

    Stages given the same breaker object in one run share its state.
    """

    failure_rate: float = attrs.field(default=0.5)
    window: int = attrs.field(default=20, validator=_positive_int)
    min_calls: int = attrs.field(default=10, validator=_positive_int)
    cooldown: float = attrs.field(default=30.0, validator=_non_negative)
    probes: int = attrs.field(default=1, validator=_positive_int)
    when_open: Literal["hold", "fail"] = attrs.field(default="hold")

    @failure_rate.validator
    def _check_rate(self, _: attrs.Attribute[float], value: float) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
            raise ValueError(f"failure_rate= must be a number in (0, 1], got {value!r}")

    @when_open.validator
    def _check_when_open(self, _: attrs.Attribute[str], value: str) -> None:
        if value not in ("hold", "fail"):
            raise ValueError(f"when_open= must be 'hold' or 'fail', got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.min_calls > self.window:
            msg = f"min_calls={self.min_calls} cannot exceed window={self.window}"
            raise ValueError(msg)


class BreakerRuntime:
    """One breaker's state during one run. Not thread-safe: used from Trio tasks only."""

    def __init__(
        self,
        config: CircuitBreaker,
        on_change: Callable[[BreakerState, BreakerState], None],
    ) -> None:
        self.config = config
        self.state: BreakerState = "closed"
        self._outcomes: deque[bool] = deque(maxlen=config.window)
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._changed = trio.Event()
        self._on_change = on_change
        self.opened = 0

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if state == "open":
            self._opened_at = trio.current_time()
            self.opened += 1
        if state in ("closed", "open"):
            self._outcomes.clear()
            self._failures = 0
            self._probes = 0
        self._changed.set()
        self._changed = trio.Event()
        self._on_change(old, state)

    async def admit(self) -> bool:
        """Wait until a call may go ahead; return whether it is a half-open probe.

        Raises :class:`CircuitOpen` instead of waiting when ``when_open="fail"``.
        """
        cfg = self.config
        while True:
            if self.state == "closed":
                return False
            if self.state == "open":
                reopen_at = self._opened_at + cfg.cooldown
                if trio.current_time() >= reopen_at:
                    self._set("half_open")
                    continue
                if cfg.when_open == "fail":
                    raise CircuitOpen("circuit breaker is open")
                changed = self._changed
                with trio.move_on_at(reopen_at):
                    await changed.wait()
                continue
            # half-open: a limited number of probes go through
            if self._probes < cfg.probes:
                self._probes += 1
                return True
            if cfg.when_open == "fail":
                raise CircuitOpen("circuit breaker is half-open and its probes are busy")
            await self._changed.wait()

    def record(self, ok: bool, probe: bool) -> None:
        if probe:
            if self.state == "half_open":
                self._set("closed" if ok else "open")
            return
        if self.state != "closed":
            return
        if len(self._outcomes) == self._outcomes.maxlen and not self._outcomes[0]:
            self._failures -= 1
        self._outcomes.append(ok)
        if not ok:
            self._failures += 1
            cfg = self.config
            n = len(self._outcomes)
            if n >= cfg.min_calls and self._failures >= cfg.failure_rate * n:
                self._set("open")

    def release_probe(self) -> None:
        """A probe ended without an outcome (cancelled): let another one through."""
        if self.state == "half_open" and self._probes > 0:
            self._probes -= 1


class TokenBucket:
    """``rate`` calls per second with bursts of up to ``burst``, shared by a stage's workers.

    A generic cell rate algorithm: each call reserves the next slot, so waiting callers
    are served in order and the rate holds exactly on Trio's clock.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._burst = burst
        self._tat = -math.inf  # theoretical arrival time of the next call

    async def acquire(self) -> None:
        now = trio.current_time()
        tat = max(self._tat, now)
        allowed_at = tat - (self._burst - 1) * self._interval
        self._tat = tat + self._interval
        if allowed_at > now:
            await trio.sleep_until(allowed_at)
        else:
            await trio.lowlevel.checkpoint()
