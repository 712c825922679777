"""How figures are written: counts, rates, durations, shares; JSON-safe values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: The multiplication sign (written as an escape: it looks like the letter x in source).
TIMES = "\u00d7"


def fmt_count(n: int | float) -> str:
    """``1234`` → ``1,234``."""
    return f"{round(n):,}"


def fmt_rate(per_second: float) -> str:
    """Items per second with as many digits as matter: ``1,234/s``, ``98.5/s``, ``0.25/s``."""
    x = per_second
    if x >= 1000:
        return f"{x:,.0f}/s"
    if x >= 100:
        return f"{x:.0f}/s"
    if x >= 10:
        return f"{x:.1f}/s"
    return f"{x:.2f}/s"


def fmt_duration(seconds: float) -> str:
    """``0.0123`` → ``12.3 ms``; ``75`` → ``1m 15s``."""
    s = seconds
    if s <= 0:
        return "0 s"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s >= 360_000:  # beyond 100 hours, hours and minutes say nothing more
        return f"{s / 3600:,.0f}h" if s < 3.6e12 else f"{s:.3g} s"
    minutes, rest = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes}m {rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def fmt_pct(fraction: float) -> str:
    return f"{fraction:.0%}"


def workers_text(workers: int | tuple[int, int]) -> str:
    """``16`` → ``16 workers``; ``(2, 8)`` → ``2..8 workers``."""
    if isinstance(workers, tuple):
        return f"{workers[0]}..{workers[1]} workers"
    return f"{workers} worker{'s' if workers != 1 else ''}"


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def options_text(options: Mapping[str, Any]) -> list[str]:
    """Stage options as short phrases for a drawing: ``ordered``, ``timeout 10 s``, …"""
    out: list[str] = []
    for key, value in options.items():
        if value is True:
            out.append(key)
        elif key in ("timeout", "batch_timeout"):
            out.append(f"{key} {fmt_duration(float(value))}")
        elif key == "rate":
            out.append(f"rate {fmt_rate(float(value))}")
        elif key == "errors":
            out.append(f"errors={value}")
        else:
            out.append(f"{key} {value}")
    return out
