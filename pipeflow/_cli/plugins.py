"""``pipeflow plugins``: the stages installed packages publish."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from importlib.metadata import EntryPoint

from .errors import EXIT_OK, one_line
from .signals import Stopped


def cmd_plugins(args: argparse.Namespace) -> int:
    from .._plugins import GROUP

    signals = getattr(args, "signals", None)
    # A real Ctrl+C while plugins import is Stopped when the command handles signals;
    # without that handler, a KeyboardInterrupt may be the user's too.
    signals_handled = signals is not None and signals.installed
    try:
        rows = _rows(signals_handled)
    except Stopped as exc:
        print(f"pipeflow: stopped by {signal.Signals(exc.signal).name}", file=sys.stderr)
        return 128 + exc.signal
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"no stage plugins installed (entry-point group {GROUP!r})")
        return EXIT_OK
    cols = ("name", "target", "package", "summary")
    shown = [{c: _printable(r[c]) for c in cols} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in shown)) for c in cols[:-1]}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols[:-1]) + "  SUMMARY")
    for r in shown:
        print(("  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + r["summary"]).rstrip())
    return EXIT_OK


def _rows(signals_handled: bool) -> list[dict[str, str]]:
    from .._plugins import discover_stages, every_stage

    chosen = discover_stages()
    rows: list[dict[str, str]] = []
    for ep in every_stage():
        first = chosen[ep.name]
        if first.value != ep.value:
            # Another package publishes the same name and is found first (a built-in
            # stage, say): shown, so that a clash is not silent, but not loaded.
            text = f"(hidden: {first.value} of {_package(first) or '?'} has this name too)"
            print(
                f"pipeflow: warning: stage plugin {ep.name!r} is published by "
                f"{_package(first) or first.value} and {_package(ep) or ep.value}: "
                f"load_stage({ep.name!r}) loads {first.value}, found first",
                file=sys.stderr,
            )
        else:
            text = _describe(ep, signals_handled)
        rows.append({"name": ep.name, "target": ep.value, "package": _package(ep), "summary": text})
    return rows


def _package(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else ""


def _describe(ep: EntryPoint, signals_handled: bool) -> str:
    """The summary of one plugin, or why it cannot be used, on one line."""
    from .. import Chain, Stage
    from .._plugins import check_value, summary

    try:
        check_value(ep)
    except ValueError:
        return f"(cannot load: malformed entry point {ep.value!r}: expected module:attribute)"
    try:
        # What a plugin prints as it imports goes to stderr: stdout is the listing
        # (--format json must stay JSON).
        with contextlib.redirect_stdout(sys.stderr):
            obj = ep.load()
    except BaseException as exc:
        # One broken plugin must not hide the others, whatever it raises on import
        # (sys.exit(), even KeyboardInterrupt); only the user's own Ctrl+C stops the
        # command.
        if isinstance(exc, Stopped) or (isinstance(exc, KeyboardInterrupt) and not signals_handled):
            raise
        message = _text(exc)
        return f"(cannot load: {type(exc).__name__}{': ' + message if message else ''})"
    try:
        if not (isinstance(obj, Stage | Chain) or callable(obj)):
            return f"(not a stage: {ep.value} is {_a(type(obj).__name__)})"
        return summary(obj)
    except Exception as exc:  # an object whose __doc__ or class lookup raises
        return f"(cannot describe: {type(exc).__name__}: {_text(exc)})"


def _text(exc: BaseException) -> str:
    """``str(exc)`` on one line, or a placeholder if even that raises."""
    try:
        return one_line(str(exc))
    except Exception:
        return "<its message cannot be shown>"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _printable(text: str) -> str:
    """``text`` without control characters (a docstring's terminal escape codes): shown
    escaped, as repr() would."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
