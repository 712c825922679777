"""``pipeflow size``: Little's Law sizing from the shell."""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from fractions import Fraction

from .._report.format import TIMES, fmt_count, fmt_duration, fmt_rate
from ..sizing import HIGH_UTILISATION, TARGET_UTILISATION, Sizing, size, workers_needed
from .errors import EXIT_OK, CliError


def _num(x: Fraction) -> str:
    f = float(x)
    if f == round(f):
        return fmt_count(f)
    # A number given as a short decimal (--target-utilisation 0.001, --headroom 0.0001):
    # all its digits, not 2 that round it to 0 (which "400 / 0 = 400,000" showed).
    digits = _decimals(x)
    places = digits if digits is not None and digits <= 6 else 2
    if digits is None and abs(f) < 1:
        places = max(2, 2 - math.floor(math.log10(abs(f))))  # 3 significant digits
    return f"{f:,.{places}f}".rstrip("0").rstrip(".")


def _decimals(x: Fraction) -> int | None:
    """The decimal places of ``x`` written out exactly, or None when it does not end."""
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    return max(twos, fives) if d == 1 else None


def _pct(x: Fraction) -> str:
    """A share as a percentage with all its digits (0.001 is 0.1%, not 0%)."""
    return f"{_num(x * 100)}%"


def advice(s: Sizing) -> tuple[list[str], list[str]]:
    """Warnings (the pool would run too hot) and notes that go with a sizing."""
    warnings: list[str] = []
    target = Fraction(str(TARGET_UTILISATION))
    if s.utilisation > target:
        at_target = workers_needed(s.in_flight * (1 + s.headroom) / s.instances, target)
        level = (
            f"above {HIGH_UTILISATION:.0%} utilisation queues grow non-linearly"
            if s.utilisation > Fraction(str(HIGH_UTILISATION))
            else f"worker pools are usually planned for ~{TARGET_UTILISATION:.0%} utilisation"
        )
        warnings.append(
            f"{float(s.utilisation):.0%} busy at {fmt_rate(float(s.rate))}: {level}; "
            f"--target-utilisation {TARGET_UTILISATION} gives {at_target} per instance"
        )
    notes = [
        "W must be your P99 latency, not P50: with heavy-tailed latencies P50 sizing collapses",
    ]
    return warnings, notes


def cmd_size(args: argparse.Namespace) -> int:
    s = size(
        args.rate,
        args.latency,
        instances=args.instances,
        headroom=args.headroom,
        target_utilisation=args.target_utilisation,
    )
    try:
        # Each number fits a float, but their products may not (--rate 1e308 --latency 10).
        for value in (s.in_flight, s.per_instance_exact, s.total):
            float(value)
    except OverflowError:
        raise CliError(
            "size: the numbers are too large: the workers needed (rate "
            f"{TIMES} latency) are beyond what a float holds"
        ) from None
    warnings, notes = advice(s)
    if args.format == "json":
        data = {
            "rate": float(s.rate),
            "latency": float(s.latency),
            "instances": s.instances,
            "headroom": float(s.headroom),
            "target_utilisation": None
            if s.target_utilisation is None
            else float(s.target_utilisation),
            "in_flight": float(s.in_flight),
            "workers_per_instance": s.per_instance,
            "workers_total": s.total,
            "utilisation": round(float(s.utilisation), 4),
            "warnings": warnings,
            "notes": notes,
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    lines = [
        f"Little's Law: L = λ {TIMES} W = {fmt_rate(float(s.rate))} {TIMES} "
        f"{fmt_duration(float(s.latency))} = {_num(s.in_flight)} in flight"
    ]
    step = s.in_flight
    if s.instances > 1:
        step = step / s.instances
        lines.append(
            f"across {s.instances} instances: {_num(s.in_flight)} / {s.instances} = {_num(step)}"
        )
    if s.headroom:
        new = step * (1 + s.headroom)
        lines.append(
            f"with {_pct(s.headroom)} headroom: "
            f"{_num(step)} {TIMES} {_num(1 + s.headroom)} = {_num(new)}"
        )
        step = new
    if s.target_utilisation is not None:
        new = step / s.target_utilisation
        lines.append(
            f"at {_pct(s.target_utilisation)} target utilisation: {_num(step)} / "
            f"{_num(s.target_utilisation)} = {_num(new)}"
        )
    lines.append("")
    total = f" ({fmt_count(s.total)} in total)" if s.instances > 1 else ""
    lines.append(f"workers per instance: {fmt_count(s.per_instance)}{total}")
    busy = float(s.utilisation)
    busy_text = f"{busy * 100:.2g}%" if 0 < busy < 0.01 else f"{busy:.0%}"
    lines.append(f"at {fmt_rate(float(s.rate))} they are {busy_text} busy")
    lines.append("")
    for prefix, texts in (("warning", warnings), ("note", notes)):
        for text in texts:
            lines += textwrap.wrap(
                f"{prefix}: {text}", 92, subsequent_indent="  ", break_on_hyphens=False
            )
    print("\n".join(lines))
    return EXIT_OK
