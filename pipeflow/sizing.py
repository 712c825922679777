"""Little's Law, the one place pipeflow computes it: how many workers a rate needs.

A pool of N workers, each taking W seconds per item, fed λ items per second, has on
average L = λW workers busy (Little's Law). Its utilisation is L/N, and it keeps up only
while L < N; the pool that runs λ at a target utilisation U has ⌈L/U⌉ workers. The worker
pool practice plans for about 70% utilisation: above 80%, queues grow non-linearly.

>>> from fractions import Fraction
>>> busy_workers(5000, Fraction("0.08"))
Fraction(400, 1)
>>> workers_needed(10.5, 0.7)
15
>>> size(Fraction(5000), Fraction("0.08"), instances=4, headroom=Fraction("0.2")).per_instance
120

Every figure pipeflow prints (run reports, ``pipeflow graph``, ``pipeflow size``, the
live views and ``StageStats.recommended_workers``) comes from these functions.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TypeVar

import attrs

__all__ = [
    "TARGET_UTILISATION",
    "HIGH_UTILISATION",
    "Sizing",
    "busy_workers",
    "capacity",
    "size",
    "utilisation",
    "workers_needed",
]

#: The default target utilisation for sizing: plan for about 70% busy workers.
TARGET_UTILISATION = 0.7
#: Above this utilisation, queueing delay grows non-linearly with load.
HIGH_UTILISATION = 0.8

Number = TypeVar("Number", float, Fraction)


def busy_workers(rate: Number, latency: Number) -> Number:
    """L = λW: the workers busy on average at ``rate`` items/s of ``latency`` seconds."""
    return rate * latency


def utilisation(busy: float, workers: float) -> float:
    """L/N: the share of ``workers`` that ``busy`` keeps busy (0 for an empty pool)."""
    return busy / workers if workers > 0 else 0.0


def capacity(workers: float, latency: float) -> float:
    """N/W: the items per second ``workers`` get through with every one of them busy."""
    return workers / latency if latency > 0 else math.inf


def workers_needed(busy: float | Fraction, target: float | Fraction = TARGET_UTILISATION) -> int:
    """⌈L/U⌉, at least 1: the pool that carries ``busy`` workers' load at ``target``.

    Exact for fractions; for floats, a quotient within 1e-9 above a whole number counts
    as that number (0.7 * 10 / 0.7 is 10, not 11).
    """
    if target <= 0:
        raise ValueError(f"target utilisation must be above 0, got {target!r}")
    exact = busy / target
    if isinstance(exact, Fraction):
        return max(1, math.ceil(exact))
    return max(1, math.ceil(exact - 1e-9))


def _exact(value: float | Fraction | str, what: str) -> Fraction:
    # A float goes through its shortest repr, so 0.08 is 8/100 exactly and 5000 * 0.08
    # * 1.2 / 4 is 120, not 120.00000000000001 (which would round up to 121).
    try:
        x = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    except (ValueError, TypeError, ZeroDivisionError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    return x


@attrs.frozen(kw_only=True)
class Sizing:
    """The answer of :func:`size` (and ``pipeflow size``), in exact fractions.

    ``in_flight`` L = λW; workers = ⌈λ·(1 + headroom)·W / utilisation / instances⌉ per
    instance: headroom raises the rate planned for, the target utilisation says how
    busy workers may be at that rate. ``utilisation`` is how busy the workers are at the
    given rate itself.
    """

    rate: Fraction
    latency: Fraction
    instances: int
    headroom: Fraction
    target_utilisation: Fraction | None
    in_flight: Fraction
    per_instance_exact: Fraction
    per_instance: int
    total: int
    utilisation: Fraction


def size(
    rate: float | Fraction | str,
    latency: float | Fraction | str,
    *,
    instances: int = 1,
    headroom: float | Fraction | str = 0,
    target_utilisation: float | Fraction | str | None = None,
) -> Sizing:
    """Little's Law sizing of a pool: ``rate`` items/s, ``latency`` seconds per item
    (your P99), split over ``instances``, with ``headroom`` on the rate (0.2 plans for
    20% more) and workers at most ``target_utilisation`` busy (default: fully).

    Exact arithmetic (so 100 * 1.2 is 120, not 120.00000000000001).
    """
    lam = _exact(rate, "rate")
    w = _exact(latency, "latency")
    extra = _exact(headroom, "headroom")
    if lam <= 0 or w <= 0:
        raise ValueError(f"rate and latency must be above 0, got {rate!r} and {latency!r}")
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be a whole number >= 1, got {instances!r}")
    if extra < 0:
        raise ValueError(f"headroom must be >= 0, got {headroom!r}")
    u = None if target_utilisation is None else _exact(target_utilisation, "target_utilisation")
    if u is not None and not 0 < u <= 1:
        raise ValueError(f"target_utilisation must be in (0, 1], got {target_utilisation!r}")
    in_flight = busy_workers(lam, w)
    exact = in_flight * (1 + extra) / (u if u is not None else 1) / instances
    per_instance = max(1, math.ceil(exact))
    total = per_instance * instances
    return Sizing(
        rate=lam,
        latency=w,
        instances=instances,
        headroom=extra,
        target_utilisation=u,
        in_flight=in_flight,
        per_instance_exact=exact,
        per_instance=per_instance,
        total=total,
        utilisation=in_flight / total,
    )
