"""Parsing the numbers users type: rates, latencies, shares, seconds, ports."""

from __future__ import annotations

import argparse
import re
import threading
from fractions import Fraction

_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"
_UNITS = {"": Fraction(1), "s": Fraction(1), "ms": Fraction(1, 1000)}
_UNITS |= {"us": Fraction(1, 10**6), "µs": Fraction(1, 10**6)}


def _fits_float(value: Fraction, text: str) -> Fraction:
    """``value``, refused when it is too large for a float (``1e999``): the figures are
    printed, and JSON written, as floats."""
    try:
        float(value)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is too large a number") from None
    return value


def parse_latency(text: str) -> Fraction:
    """``80ms``, ``0.08s``, ``80000us`` or ``0.08`` → seconds, exactly. A bare number
    of 1 or more is refused: ``80`` meant as milliseconds would size for 80 seconds, a
    thousand times too many workers (a bare number below 1 is seconds: a latency of
    ``0.08`` ms would be written with its unit)."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s*(s|ms|us|µs)?\s*", text)
    if m is None or Fraction(m[1]) <= 0:
        msg = f"expected a duration > 0 like 80ms or 0.08s, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    if m[2] is None and Fraction(m[1]) < 1:
        return Fraction(m[1])
    if m[2] is None:
        msg = (
            f"{text.strip()!r} has no unit: write {m[1]}ms or {m[1]}s "
            "(a latency like 80ms, 0.08s or 80000us)"
        )
        raise argparse.ArgumentTypeError(msg)
    return _fits_float(Fraction(m[1]) * _UNITS[m[2]], text)


def parse_rate(text: str) -> Fraction:
    """``5000``, ``5,000`` or ``5000/s`` → items per second, exactly."""
    cleaned = text.strip().removesuffix("/s").replace(",", "").replace("_", "")
    if re.fullmatch(_NUMBER, cleaned) is None or Fraction(cleaned) <= 0:
        msg = f"expected a number of items per second > 0 like 5000, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return _fits_float(Fraction(cleaned), text)


def _parse_share(text: str, what: str, example: str) -> Fraction:
    """``20%`` or ``0.2`` → 0.2. A bare number above 1 is refused: it is almost surely
    a percentage without its sign, and 20 would mean 2000%."""
    body = text.strip().removesuffix("%").strip()
    if re.fullmatch(_NUMBER, body) is None:
        raise argparse.ArgumentTypeError(f"expected {what} like {example}, got {text!r}")
    if text.strip().endswith("%"):
        return _fits_float(Fraction(body) / 100, text)
    value = _fits_float(Fraction(body), text)
    if value > 1:
        msg = f"{text!r} looks like a percentage: write {body}% or {float(value) / 100:g}"
        raise argparse.ArgumentTypeError(msg)
    return value


def parse_headroom(text: str) -> Fraction:
    """``20%`` or ``0.2`` → 0.2."""
    return _parse_share(text, "headroom", "20% or 0.2")


def parse_utilisation(text: str) -> Fraction:
    """``70%`` or ``0.7`` → 0.7 (a fraction in (0, 1])."""
    value = _parse_share(text, "a utilisation", "70% or 0.7")
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a utilisation above 0, got {text!r}")
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a utilisation of at most 100%, got {text!r}")
    return value


#: The most instances ``pipeflow size`` splits a load over: beyond, the answer is
#: always 1 worker each and the totals stop meaning anything.
MAX_INSTANCES = 1_000_000


def instances(text: str) -> int:
    """``4`` → 4: a whole number of instances from 1 to :data:`MAX_INSTANCES`."""
    value = _positive_int(text)
    if value > MAX_INSTANCES:
        msg = f"expected at most {MAX_INSTANCES:,} instances, got {text.strip()!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    m = re.fullmatch(rf"\s*({_NUMBER})\s*(s|ms|us|µs)?\s*", text)
    if m is None:
        msg = f"expected a number of seconds like 10, 10s or 500ms, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return float(_fits_float(Fraction(m[1]) * _UNITS[m[2] or ""], text))


def _interval(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    # time.sleep() overflows beyond this (about 292 years).
    if value > threading.TIMEOUT_MAX:
        msg = f"expected at most {threading.TIMEOUT_MAX:.0f} seconds, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _host(text: str) -> str:
    if not text.strip() or text != text.strip():
        msg = f"expected an address to listen on, such as 127.0.0.1, 0.0.0.0 or ::1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        msg = f"expected a TCP port number 0..65535 (0 picks a free one), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value
