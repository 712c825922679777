"""The ``pipeflow`` command: ``run``, ``graph``, ``size`` and ``plugins``.

Exit statuses: 0 success; 1 the run failed (or items failed under ``errors="collect"``);
2 bad input (an unknown module, a file that cannot be read, a bad number, an unreachable
URL): one line on stderr, ``pipeflow: error: ...``, never a traceback; 128 + the signal
number (130 for SIGINT, 143 for SIGTERM) for a run stopped by a signal after draining.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import http.client
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import sys
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, NoReturn, TextIO

import attrs
import trio

from ._chain import Chain
from ._errors import StageError
from ._pipeline import Pipeline
from ._report import (
    TIMES,
    GraphView,
    ReportError,
    Scrape,
    Series,
    build_report,
    describe_pipeline,
    fmt_count,
    fmt_duration,
    fmt_pct,
    fmt_rate,
    load_report,
    parse_exposition,
    render,
    render_many,
    result_dict_from_stats,
    view_from_pipeline,
    view_from_report,
    views_from_scrapes,
)
from ._stage import Stage
from ._stats import StageStats, find_bottleneck

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FORMATS = ("text", "json", "dot", "mermaid", "html")


class CliError(Exception):
    """Bad input: printed as one line, ``pipeflow: error: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints a usage block and exits; the CLI's contract is one line and
    # exit status 2, raised so that main() is testable without catching SystemExit.
    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("pipeflow").strip()
        hint = f" (see pipeflow {where} --help)" if where else " (see pipeflow --help)"
        raise CliError(f"{where + ': ' if where else ''}{message}{hint}")


# -- numbers ------------------------------------------------------------------------------

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
    """``80ms``, ``0.08s`` or ``0.08`` (seconds) → seconds, exactly."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s*(s|ms|us|µs)?\s*", text)
    if m is None or Fraction(m[1]) <= 0:
        msg = f"expected a duration > 0 like 80ms, 0.08s or 0.08 (seconds), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return _fits_float(Fraction(m[1]) * _UNITS[m[2] or ""], text)


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


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        msg = f"expected a TCP port number 0..65535 (0 picks a free one), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="pipeflow",
        description="Run streaming pipelines, see where their bottleneck is, and size them.",
    )
    parser.add_argument("--version", action="version", version=f"pipeflow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="run a pipeline over the lines of a file, with a live progress view",
        description="Run MODULE:PIPELINE over the lines of --input (one item per line, "
        "newline stripped), show its progress, and optionally save its report.",
    )
    run.add_argument(
        "target", metavar="MODULE:PIPELINE", help="e.g. app:pipeline or app.py:pipeline"
    )
    src = run.add_mutually_exclusive_group()
    src.add_argument(
        "--input", metavar="FILE", help="read items from FILE, one per line; '-' reads stdin"
    )
    src.add_argument(
        "--source",
        metavar="URL",
        help="take items from a Redis stream: redis://HOST:PORT/DB?stream=S&group=G&...",
    )
    run.add_argument("--report", metavar="FILE", help="write the run report as JSON to FILE")
    run.add_argument(
        "--metrics-port", metavar="N", type=_port, help="serve Prometheus metrics on 127.0.0.1:N"
    )
    run.add_argument(
        "--grace",
        metavar="S",
        type=_seconds,
        default=10.0,
        help="on SIGINT/SIGTERM, let in-flight items finish for up to S seconds (default 10)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress view, no summary")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="also show info events (run_started, ...)"
    )
    run.set_defaults(func=cmd_run)

    graph = commands.add_parser(
        "graph",
        help="draw a pipeline's stages and their throughput",
        description="Draw TARGET: a MODULE:PIPELINE (structure), a saved run report "
        "(measured figures, bottleneck and sizing), or the http:// metrics URL of a "
        "running pipeline (live rates between two scrapes).",
    )
    graph.add_argument("target", metavar="TARGET", help="MODULE:PIPELINE, REPORT.json or URL")
    graph.add_argument(
        "--format",
        "-f",
        choices=FORMATS,
        help="default: from the --output suffix (.html, .json, .dot, .mmd), else text",
    )
    graph.add_argument("--output", "-o", metavar="FILE", help="write to FILE, not stdout")
    graph.add_argument(
        "--watch", action="store_true", help="metrics URL: refresh every interval until Ctrl+C"
    )
    graph.add_argument(
        "--interval",
        metavar="S",
        type=_interval,
        default=1.0,
        help="metrics URL: seconds between two scrapes (default 1)",
    )
    graph.set_defaults(func=cmd_graph)

    size = commands.add_parser(
        "size",
        help="size a worker pool with Little's Law",
        description="Workers = rate * latency (Little's Law: L = λW), split across "
        "instances, with headroom on the rate and a target utilisation.",
    )
    size.add_argument("--rate", required=True, type=parse_rate, metavar="R", help="items/s λ")
    size.add_argument(
        "--latency",
        required=True,
        type=parse_latency,
        metavar="W",
        help="time per item W, your P99: 80ms, 0.08s or 0.08",
    )
    size.add_argument("--instances", type=_positive_int, default=1, metavar="K", help="default 1")
    size.add_argument(
        "--headroom", type=parse_headroom, default=Fraction(0), metavar="H", help="20%% or 0.2"
    )
    size.add_argument(
        "--target-utilisation",
        dest="target_utilisation",
        type=parse_utilisation,
        default=None,
        metavar="U",
        help="how busy workers may be at the planned rate: 70%% or 0.7 (default: not set)",
    )
    size.add_argument("--format", "-f", choices=("text", "json"), default="text")
    size.set_defaults(func=cmd_size)

    plugins = commands.add_parser(
        "plugins",
        help="list installed stage plugins (entry-point group pipeflow.stages)",
        description="List the stages that installed packages publish in the entry-point "
        "group 'pipeflow.stages'.",
    )
    plugins.add_argument("--format", "-f", choices=("text", "json"), default="text")
    plugins.set_defaults(func=cmd_plugins)

    demo = commands.add_parser(
        "demo",
        help="scrape a small local site with the live view, then show the bottleneck",
        description="Run the web scraper example (examples/scraper.py) against a small "
        "site it serves on 127.0.0.1, with the live progress view, then print where the "
        "bottleneck was. Needs a source checkout and the http extra.",
    )
    demo.add_argument(
        "--pages", type=_positive_int, default=120, help="pages on the local site (120)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pipeflow`` command with ``argv`` (default: ``sys.argv[1:]``); return
    its exit status."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version print and "exit" 0
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if args.command is None:
            raise CliError(
                "a command is required: run, graph, size, plugins or demo (see pipeflow --help)"
            )
        status: int = args.func(args)
        return status
    except CliError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`pipeflow graph ... | head`): not an error worth a
        # traceback. Point stdout at devnull so the interpreter's final flush is quiet.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(message: str) -> None:
    print(f"pipeflow: error: {_one_line(message)}", file=sys.stderr, flush=True)


# -- loading MODULE:PIPELINE --------------------------------------------------------------


def _where(exc: BaseException) -> str:
    """`` (app.py, line 3)``: where in the user's code an import failed."""
    if isinstance(exc, SyntaxError):
        return ""  # str(SyntaxError) already ends with "(app.py, line 3)"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        return f" ({Path(last.filename).name}, line {last.lineno})"
    return ""


def _import(module: str) -> Any:
    if module.endswith(".py") or "/" in module or os.sep in module:
        path = Path(module)
        if not path.is_file():
            raise CliError(f"no such file: {module}")
        name = path.stem
        directory = str(path.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # as `python app.py` would
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - .py files always load
            raise CliError(f"cannot import {module}")
        mod = importlib.util.module_from_spec(spec)
        # In sys.modules before it runs, so pickling (process workers) finds it by name.
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except (Exception, SystemExit) as exc:
            # SystemExit too: a script that parses its own arguments on import. (Not
            # KeyboardInterrupt: Ctrl+C during the import still stops the command.)
            del sys.modules[name]
            raise CliError(
                f"cannot import {module}: {type(exc).__name__}: {exc}{_where(exc)}"
            ) from None
        return mod
    if not all(part.isidentifier() for part in module.split(".")):
        raise CliError(f"{module!r} is not a module name (expected MODULE:PIPELINE)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise CliError(
                f"no module named {module!r} (looked in the current directory and sys.path)"
            ) from None
        raise CliError(
            f"cannot import module {module!r}: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None
    except (Exception, SystemExit) as exc:  # SystemExit: see above
        raise CliError(
            f"cannot import module {module!r}: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None


def load_pipeline(spec: str) -> Pipeline[Any, Any]:
    """The pipeline named by ``MODULE:PIPELINE`` (a module name, or a path to a ``.py``
    file; the attribute may be dotted). A stage or a chain is wrapped in a Pipeline
    named after the attribute."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise CliError(
            f"expected MODULE:PIPELINE (for example app:pipeline or app.py:pipeline), got {spec!r}"
        )
    mod = _import(module)
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            found = sorted(
                n for n, v in vars(mod).items() if isinstance(v, Pipeline | Chain | Stage)
            )
            hint = f" (pipelines and stages there: {', '.join(found)})" if found else ""
            raise CliError(f"module {module!r} has no attribute {attr!r}{hint}") from None
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, Chain | Stage):
        return Pipeline(obj, name=attr.rpartition(".")[2])
    kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
    raise CliError(f"{spec} is {kind}, not a pipeflow.Pipeline (nor a stage or chain)")


# -- pipeflow size ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Sizing:
    """The answer of ``pipeflow size``: Little's Law with headroom and a target
    utilisation.

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
    warnings: tuple[str, ...]
    notes: tuple[str, ...]


def size(
    rate: Fraction,
    latency: Fraction,
    *,
    instances: int = 1,
    headroom: Fraction = Fraction(0),
    target_utilisation: Fraction | None = None,
) -> Sizing:
    """Little's Law sizing, in exact arithmetic (so 100 * 1.2 is 120, not 120.000...01)."""
    in_flight = rate * latency
    u = target_utilisation if target_utilisation is not None else Fraction(1)
    exact = in_flight * (1 + headroom) / u / instances
    per_instance = max(1, math.ceil(exact))
    total = per_instance * instances
    utilisation = in_flight / total
    warnings: list[str] = []
    if utilisation > Fraction(7, 10):
        at_70 = max(1, math.ceil(in_flight * (1 + headroom) / Fraction(7, 10) / instances))
        level = (
            "above 80% utilisation queues grow non-linearly"
            if utilisation > Fraction(8, 10)
            else "the seed plans for ~70% utilisation"
        )
        warnings.append(
            f"{float(utilisation):.0%} busy at {fmt_rate(float(rate))}: {level}; "
            f"--target-utilisation 0.7 gives {at_70} per instance"
        )
    notes = [
        "W must be your P99 latency, not P50: with heavy-tailed latencies P50 sizing collapses",
    ]
    return Sizing(
        rate=rate,
        latency=latency,
        instances=instances,
        headroom=headroom,
        target_utilisation=target_utilisation,
        in_flight=in_flight,
        per_instance_exact=exact,
        per_instance=per_instance,
        total=total,
        utilisation=utilisation,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def _num(x: Fraction) -> str:
    f = float(x)
    return fmt_count(f) if f == round(f) else f"{f:,.2f}".rstrip("0").rstrip(".")


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
            "warnings": list(s.warnings),
            "notes": list(s.notes),
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
            f"with {float(s.headroom):.0%} headroom: "
            f"{_num(step)} {TIMES} {_num(1 + s.headroom)} = {_num(new)}"
        )
        step = new
    if s.target_utilisation is not None:
        new = step / s.target_utilisation
        lines.append(
            f"at {float(s.target_utilisation):.0%} target utilisation: {_num(step)} / "
            f"{_num(s.target_utilisation)} = {_num(new)}"
        )
    lines.append("")
    total = f" ({fmt_count(s.total)} in total)" if s.instances > 1 else ""
    lines.append(f"workers per instance: {s.per_instance}{total}")
    lines.append(f"at {fmt_rate(float(s.rate))} they are {float(s.utilisation):.0%} busy")
    lines.append("")
    for prefix, texts in (("warning", s.warnings), ("note", s.notes)):
        for text in texts:
            lines += textwrap.wrap(
                f"{prefix}: {text}", 92, subsequent_indent="  ", break_on_hyphens=False
            )
    print("\n".join(lines))
    return EXIT_OK


# -- pipeflow plugins ---------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from ._plugins import GROUP, discover_stages, summary

    rows: list[dict[str, str]] = []
    for name, ep in discover_stages().items():
        try:
            text = summary(ep.load())
        except (Exception, SystemExit) as exc:  # one broken plugin must not hide the others
            text = f"(cannot load: {type(exc).__name__}: {_one_line(str(exc))})"
        dist = ep.dist
        package = f"{dist.name} {dist.version}" if dist is not None else ""
        rows.append({"name": name, "target": ep.value, "package": package, "summary": text})
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"no stage plugins installed (entry-point group {GROUP!r})")
        return EXIT_OK
    cols = ("name", "target", "package", "summary")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:-1]}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols[:-1]) + "  SUMMARY")
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + r["summary"])
    return EXIT_OK


# -- pipeflow graph -----------------------------------------------------------------------


def _stdout_unicode() -> bool:
    try:
        ("─│┌▼◀λ" + TIMES).encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _stdout_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror or exc}") from None


def _scrape(url: str) -> Scrape:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise CliError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise CliError(f"cannot reach {url}: {text}") from None
    except (http.client.InvalidURL, ValueError) as exc:
        raise CliError(f"invalid URL {url}: {exc}") from None
    except http.client.HTTPException as exc:
        # Not an HTTP server (an SSH or Redis port), or one that hung up mid-answer.
        raise CliError(
            f"no valid HTTP answer from {url}: {type(exc).__name__}: {exc!s:.80}"
        ) from None
    try:
        return parse_exposition(body)
    except ReportError as exc:
        raise CliError(f"{url}: {exc}") from None


def _target_kind(target: str) -> str:
    if re.match(r"https?://", target):
        return "metrics"
    path = Path(target)
    if path.suffix.lower() == ".json" or path.is_file():
        return "report"
    return "pipeline"


_SUFFIX_FORMATS = {".html": "html", ".htm": "html", ".json": "json", ".dot": "dot", ".gv": "dot"}
_SUFFIX_FORMATS |= {".mmd": "mermaid", ".mermaid": "mermaid", ".txt": "text"}


def cmd_graph(args: argparse.Namespace) -> int:
    if args.format is None:
        suffix = Path(args.output).suffix.lower() if args.output else ""
        args.format = _SUFFIX_FORMATS.get(suffix, "text")
    kind = _target_kind(args.target)
    if args.watch and kind != "metrics":
        raise CliError("--watch needs the http:// metrics URL of a running pipeline")
    if args.format == "html" and args.output is None and sys.stdout.isatty():
        raise CliError("--format html writes a page: give --output FILE (or redirect stdout)")
    unicode = True if args.output else _stdout_unicode()
    color = args.output is None and args.format == "text" and _stdout_color()
    if kind == "metrics":
        return _graph_live(args, unicode=unicode, color=color)
    if kind == "report":
        try:
            text = Path(args.target).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CliError(f"cannot read report {args.target}: {reason}") from None
        try:
            view = view_from_report(load_report(text, args.target), args.target)
        except ReportError as exc:
            raise CliError(str(exc)) from None
    else:
        view = view_from_pipeline(load_pipeline(args.target), args.target)
    _emit(render(view, args.format, unicode=unicode, color=color), args.output)
    if args.output:
        print(f"wrote {args.output}")
    return EXIT_OK


def _graph_live(args: argparse.Namespace, *, unicode: bool, color: bool) -> int:
    url = args.target
    series: dict[str, dict[str, Any]] = {}
    live_screen = args.watch and args.output is None and sys.stdout.isatty()
    before = _scrape(url)
    t_before = start = time.monotonic()
    try:
        while True:
            time.sleep(args.interval)
            try:
                after = _scrape(url)
            except CliError as exc:
                if not args.watch:
                    raise
                # The endpoint lives as long as the run: once it is gone, so is the run.
                print(f"pipeflow: {exc}: the run has ended", file=sys.stderr)
                break
            t_after = time.monotonic()
            views = views_from_scrapes(before, after, t_after - t_before, url)
            views = [_add_series(v, series, t_after - start) for v in views]
            text = render_many(views, args.format, unicode=unicode, color=color)
            if live_screen:
                sys.stdout.write("\x1b[H\x1b[2J")
            _emit(text, args.output)
            if not args.watch:
                break
            if not live_screen and args.output is None:
                print(flush=True)
            before, t_before = after, t_after
    except KeyboardInterrupt:
        pass  # --watch runs until Ctrl+C: that is its normal end
    if args.output:
        print(f"wrote {args.output}")
    return EXIT_OK


def _add_series(view: GraphView, series: dict[str, dict[str, Any]], t: float) -> GraphView:
    s = series.setdefault(view.pipeline, {"interval": None, "t": [], "stages": {}})
    s["t"].append(round(t, 3))
    for st in view.stages:
        column = s["stages"].setdefault(st.name, {"throughput": []})["throughput"]
        column.extend([0.0] * (len(s["t"]) - 1 - len(column)))
        column.append(st.throughput or 0.0)
    return attrs.evolve(view, series=s)


# -- pipeflow run -------------------------------------------------------------------------


class InputError(Exception):
    """The input could not be read as text lines."""


ChunkReader = Callable[[], Awaitable[bytes]]
Closer = Callable[[], Awaitable[None]]
#: Opens the input inside Trio: returns "read a chunk (b'' at the end)" and "close".
Opener = Callable[[], Awaitable[tuple[ChunkReader, Closer]]]


async def _lines(open_input: Opener, where: str) -> AsyncIterator[str]:
    """Lines of UTF-8 text, the newline (and a carriage return before it) stripped."""
    read, close = await open_input()
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    offset = 0  # bytes read so far
    try:
        while True:
            chunk = await read()
            # The decoder holds back the bytes of an incomplete character; an error's
            # start counts from the first of them, which ``offset`` already passed.
            held = len(decoder.getstate()[0])
            try:
                text = pending + decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                msg = f"{where} is not UTF-8 text (byte {offset - held + exc.start})"
                raise InputError(msg) from None
            offset += len(chunk)
            *lines, pending = text.split("\n")
            for line in lines:
                # A graceful stop cancels the source, then closes its channel. If the
                # source is between two checkpoints then (it was just woken from a
                # send), its next send would hit the closed channel: stop here first.
                # (Cheap: it only yields when cancelled.)
                await trio.lowlevel.checkpoint_if_cancelled()
                yield line.removesuffix("\r")
            if not chunk:
                break
        if pending:
            yield pending.removesuffix("\r")
    finally:
        with trio.CancelScope(shield=True):
            await close()


def _file_input(file: IO[bytes]) -> Opener:
    async def open_input() -> tuple[ChunkReader, Closer]:
        async def read() -> bytes:
            # A local file's chunk is read in the event loop (microseconds from the page
            # cache), not in a thread, whose read could not be cancelled.
            await trio.lowlevel.checkpoint()
            return file.read(1 << 16)

        async def close() -> None:
            file.close()

        return read, close

    return open_input


def _stdin_input() -> Opener:
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        raise CliError("--input -: there is no stdin to read") from None
    if os.name != "posix" or stat.S_ISREG(mode):
        # A regular file cannot be waited on (epoll refuses it): read it in a thread.
        return _file_input(os.fdopen(os.dup(0), "rb"))

    async def open_input() -> tuple[ChunkReader, Closer]:
        # A pipe or a terminal: an async stream, so that Ctrl+C and cancellation are
        # not stuck behind a blocking read.
        stream = trio.lowlevel.FdStream(os.dup(0))

        async def read() -> bytes:
            return await stream.receive_some(1 << 16)

        return read, stream.aclose

    return open_input


@attrs.define
class _Outcome:
    result: Any = None
    error: BaseException | None = None
    stats: Mapping[str, StageStats] | None = None
    stats_at: float = 0.0  # when ``stats`` was sampled
    elapsed: float = 0.0
    signal: int | None = None


class _Progress:
    """The live view on a terminal, plain periodic lines elsewhere, nothing if quiet."""

    LINE_EVERY = 5.0

    def __init__(self, out: TextIO, *, mode: str, title: str) -> None:
        self.out = out
        self.mode = mode  # "live", "lines" or "off"
        self.title = title
        self._drawn = 0
        self._lines: list[str] = []
        self._next_line = self.LINE_EVERY
        self._bar_full, self._bar_empty = ("█", "░") if _stdout_unicode() else ("#", ".")

    def update(self, t: float, stats: Mapping[str, StageStats], series: Series) -> None:
        if self.mode == "live":
            self._lines = self._view(t, stats, series)
            self._draw()
        elif self.mode == "lines" and t >= self._next_line - 1e-9:
            self._next_line += self.LINE_EVERY
            self.out.write(self._plain(t, stats) + "\n")
            self.out.flush()

    def _done(self, stats: Mapping[str, StageStats]) -> int:
        last = list(stats.values())[-1]
        return last.ok + last.filtered + last.failed

    def _view(self, t: float, stats: Mapping[str, StageStats], series: Series) -> list[str]:
        done = self._done(stats)
        rate = done / t if t > 0 else 0.0
        head = f"{self.title} · {t:.1f} s · {fmt_count(done)} done · {fmt_rate(rate)}"
        width = max(len(n) for n in stats)
        bottleneck = find_bottleneck(stats)
        lines = [head]
        for name, s in stats.items():
            n = max(s.workers, 1)
            filled = round(12 * min(s.busy_workers / n, 1.0))
            bar = self._bar_full * filled + self._bar_empty * (12 - filled)
            recent = series.latest(name, "throughput")
            r = recent if recent is not None else s.throughput
            busy = f"{s.busy_workers}/{s.workers}"
            line = (
                f"  {name:<{width}} {bar} {busy:>5} busy · queue {s.queue_depth} · "
                f"out {fmt_count(s.items_out)} · {fmt_rate(r)}"
            )
            if s.failed:
                line += f" · failed {fmt_count(s.failed)}"
            if name == bottleneck:
                line += " ◀ busiest" if self._bar_full == "█" else " <- busiest"
            lines.append(line)
        return lines

    def _plain(self, t: float, stats: Mapping[str, StageStats]) -> str:
        done = self._done(stats)
        parts = [f"[{t:6.1f}s] {fmt_count(done)} done ({fmt_rate(done / t if t > 0 else 0)})"]
        for name, s in stats.items():
            parts.append(f"{name} {s.busy_workers}/{s.workers} busy, queue {s.queue_depth}")
        return " | ".join(parts)

    def _draw(self) -> None:
        cols = shutil.get_terminal_size().columns
        buf = []
        if self._drawn:
            buf.append(f"\x1b[{self._drawn}F")
        else:
            buf.append("\x1b[?25l")  # hide the cursor while the view is live
        for line in self._lines:
            buf.append("\x1b[2K" + line[: cols - 1] + "\n")
        buf.append("\x1b[J")
        self._drawn = len(self._lines)
        self.out.write("".join(buf))
        self.out.flush()

    def clear(self) -> None:
        """Erase the live view (before a log line is printed above it)."""
        if self.mode == "live" and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self.out.flush()
            self._drawn = 0

    def redraw(self) -> None:
        if self.mode == "live" and self._lines:
            self._draw()

    def close(self) -> None:
        if self.mode == "live":
            self.clear()
            self.out.write("\x1b[?25h")
            self.out.flush()


class _LogHandler(logging.Handler):
    """pipeflow's events on stderr, printed above the live view."""

    def __init__(self, progress: _Progress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname.lower()}: {_one_line(record.getMessage())}\n"
            self.progress.clear()
            sys.stderr.write(line)
            sys.stderr.flush()
            self.progress.redraw()
        except Exception:
            self.handleError(record)


class _RunCommand:
    """``pipeflow run``: the run, its progress view, its time series and report."""

    TICK_LIVE = 0.25

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.target: str = args.target
        self.pipeline = load_pipeline(args.target)
        self.kwargs: dict[str, Any] = {"collect": False}
        params = inspect.signature(self.pipeline.arun).parameters
        # Graceful shutdown lives in Pipeline.arun (handle_signals=, grace=) when this
        # version of the core has it; otherwise Ctrl+C interrupts at once.
        self.native_signals = "handle_signals" in params and "grace" in params
        if self.native_signals and _in_main_thread():
            self.kwargs |= {"handle_signals": True, "grace": args.grace}
        if args.metrics_port is not None:
            self.kwargs["metrics_port"] = args.metrics_port
        if args.report:
            _check_report_path(args.report)
        # Last: the source may print a notice, which must not precede an error line.
        self.source = self._source()
        self.series = Series(interval=1.0)
        mode = "off" if args.quiet else ("live" if sys.stdout.isatty() else "lines")
        self.progress = _Progress(sys.stdout, mode=mode, title=f"pipeflow run {self.target}")
        self.outcome = _Outcome()
        self.t0 = 0.0
        self.metrics_url: str | None = None

    def _source(self) -> Any:
        args = self.args
        if args.source is not None:
            return self._redis_source(args.source)
        if args.input is None:
            print(
                "pipeflow: no --input given: running with no items "
                "(--input FILE reads a file, --input - reads stdin)",
                file=sys.stderr,
            )
            return []
        if args.input == "-":
            return _lines(_stdin_input(), "stdin")
        try:
            file = open(args.input, "rb")  # noqa: SIM115 - closed by the line reader
        except OSError as exc:
            raise CliError(f"cannot read --input {args.input}: {exc.strerror or exc}") from None
        if Path(args.input).is_dir():
            file.close()
            raise CliError(f"cannot read --input {args.input}: it is a directory")
        return _lines(_file_input(file), args.input)

    def _redis_source(self, url: str) -> Any:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise CliError(
                f"--source: unsupported URL {url!r} (expected redis://HOST:PORT/DB?stream=..., "
                f"rediss:// or unix://)"
            )
        try:
            from pipeflow.connectors.redis import RedisStreamSource
        except ImportError as exc:
            raise CliError(
                f"--source redis:// needs pipeflow.connectors.redis and the redis client "
                f"(pip install 'pipeflow[redis]'): {exc}"
            ) from None
        try:
            return RedisStreamSource.from_url(url)
        except (ValueError, TypeError) as exc:
            raise CliError(f"--source: {exc}") from None

    # -- inside trio.run --

    async def execute(self) -> None:
        self.t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            try:
                self.outcome.result = await self.pipeline.arun(self.source, **self.kwargs)
            except (Exception, KeyboardInterrupt) as exc:
                # A KeyboardInterrupt here is pipeflow.Interrupted: the run drained after
                # a signal and carries its partial result.
                self.outcome.error = exc
            finally:
                self.outcome.elapsed = trio.current_time() - self.t0
                nursery.cancel_scope.cancel()

    async def _watch(self) -> None:
        tick = self.TICK_LIVE if self.progress.mode == "live" else 1.0
        if "metrics_port" in self.kwargs:
            # Say where the metrics are as soon as the endpoint listens.
            while self.metrics_url is None:
                await trio.sleep(0.01)
                self._announce_metrics()
        next_sample = 1.0
        k = 0
        while True:
            k += 1
            await trio.sleep_until(self.t0 + k * tick)
            self._announce_metrics()
            stats = self.pipeline.current_stats()
            if stats is None:
                continue
            t = trio.current_time() - self.t0
            self.outcome.stats, self.outcome.stats_at = stats, t
            if t >= next_sample - 1e-9:
                self.series.sample(t, stats)
                next_sample += 1.0
            self.progress.update(t, stats, self.series)

    def _announce_metrics(self) -> None:
        if "metrics_port" not in self.kwargs or self.metrics_url is not None:
            return
        # The metrics service sets this once it listens (the port is known then, even
        # for --metrics-port 0).
        address = getattr(self.pipeline, "metrics_address", None)
        if address:
            host, port = address
            self.metrics_url = f"http://{host}:{port}/metrics"
            self.progress.clear()
            print(f"pipeflow: serving metrics at {self.metrics_url}", file=sys.stderr, flush=True)
            self.progress.redraw()

    # -- after --

    def __call__(self) -> int:
        logger = logging.getLogger("pipeflow")
        handler = _LogHandler(self.progress)
        saved = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if self.args.verbose else logging.WARNING)
        logger.propagate = False
        try:
            try:
                trio.run(self.execute)
            except BaseException as exc:
                # Without graceful shutdown in the core, Ctrl+C arrives as a bare
                # KeyboardInterrupt (possibly inside an exception group).
                if not _contains(exc, KeyboardInterrupt):
                    raise
                self.outcome.error = KeyboardInterrupt()
                self.outcome.signal = signal.SIGINT
        finally:
            self.progress.close()
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
        return self._finish()

    def _finish(self) -> int:
        o = self.outcome
        err = o.error
        status, failure, code, signum = "completed", None, EXIT_OK, None
        result = o.result
        if isinstance(err, KeyboardInterrupt):
            signum = getattr(err, "signal", None) or o.signal or signal.SIGINT
            status, code = "interrupted", 128 + int(signum)
            result = getattr(err, "result", None)
        elif isinstance(err, NotImplementedError) and "metrics_port" in self.kwargs:
            raise CliError(f"--metrics-port: {err}")
        elif isinstance(err, OSError) and "metrics_port" in self.kwargs and not self.metrics_url:
            # The endpoint could not listen (the port is taken): nothing ran.
            raise CliError(f"--metrics-port {self.args.metrics_port}: {err}")
        elif isinstance(err, InputError):
            raise CliError(str(err))
        elif isinstance(err, StageError):
            status, failure, code = "failed", str(err), EXIT_FAILED
            # The core attaches the stopped run's result (its final statistics) to a
            # fail-fast error; without it, the last sample is all there is.
            result = err.result
        elif err is not None:
            status, failure, code = "failed", f"{type(err).__name__}: {err}", EXIT_FAILED
        stats_at: float | None = None
        if result is not None:
            data = result.to_dict()
            t_end = result.elapsed
        else:
            stats_at = o.stats_at
            stats = o.stats or {}
            data = result_dict_from_stats(
                self.pipeline.name,
                stats,
                o.elapsed,
                find_bottleneck(stats),
                [st.name for st in self.pipeline.stages],
            )
            t_end = o.elapsed
        if result is not None and t_end > (self.series.t[-1] if self.series.t else 0) + 1e-6:
            self.series.sample(t_end, result.stats)
        if status == "completed" and data.get("errors"):
            n = len(data["errors"])
            failure = f"{n} item{'s' if n != 1 else ''} failed; first: {data['errors'][0]}"
            code = EXIT_FAILED
        report = build_report(
            target=self.target,
            status=status,
            result=data,
            structure=describe_pipeline(self.pipeline),
            series=self.series,
            failure=failure,
            signal=signal.Signals(signum).name if signum else None,
            stats_at=stats_at,
        )
        if self.args.report:
            try:
                Path(self.args.report).write_text(
                    json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
                )
            except OSError as exc:
                raise CliError(f"cannot write report {self.args.report}: {exc.strerror}") from None
        if not self.args.quiet:
            print(summary(report, self.args.report))
        if failure is not None:
            label = "run failed" if status == "failed" else "items failed"
            print(f"pipeflow: {label}: {_one_line(failure)}", file=sys.stderr)
        elif status == "interrupted":
            name = signal.Signals(signum).name if signum else "signal"
            print(f"pipeflow: stopped by {name}", file=sys.stderr)
        return code


def _check_report_path(report: str) -> None:
    """Refuse a --report path that cannot be written, before the run rather than after."""
    path = Path(report)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CliError(f"cannot write report {report}: no such directory {parent}")
    if path.is_dir():
        raise CliError(f"cannot write report {report}: it is a directory")


def _in_main_thread() -> bool:
    # Signal handlers can only be installed from the main thread.
    return threading.current_thread() is threading.main_thread()


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(e, kind) for e in exc.exceptions)
    return False


def summary(report: Mapping[str, Any], report_path: str | None = None) -> str:
    """The end-of-run summary: totals, a table per stage, the bottleneck and its size."""
    stats_at = report.get("stats_at")
    if stats_at == 0:
        # The run raised before a first sample: there are no counts to show.
        elapsed = report.get("elapsed") or 0.0
        return (
            f"{report.get('status', 'failed')} after {fmt_duration(elapsed)}, before its "
            f"statistics were first sampled" + (f"\nreport: {report_path}" if report_path else "")
        )
    view = view_from_report(report, report_path or "")
    stages = view.stages
    first, last = stages[0], stages[-1]
    failed = sum(s.failed or 0 for s in stages)
    elapsed = view.elapsed or 0.0
    done = last.items_out or 0
    head = (
        f"{report.get('status', 'completed')} in {fmt_duration(elapsed)}: "
        f"{fmt_count(first.items_in or 0)} items in, {fmt_count(done)} out, "
        f"{fmt_count(failed)} failed"
    )
    if elapsed > 0:
        head += f"; {fmt_rate(last.throughput or 0.0).removesuffix('/s')} items/s"
    cols = ["stage", "workers", "in", "out", "failed", "items/s", "util", "p99", "blocked"]
    rows = [cols]
    for s in stages:
        rows.append(
            [
                s.name,
                str(round(s.workers_now)) if s.workers_now else s.workers_label().split(" ")[0],
                fmt_count(s.items_in or 0),
                fmt_count(s.items_out or 0),
                fmt_count(s.failed or 0),
                fmt_rate(s.throughput or 0.0).removesuffix("/s"),
                fmt_pct(s.utilisation or 0.0),
                fmt_duration(s.duration_p99 or 0.0),
                fmt_pct(s.blocked_fraction or 0.0),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    table = [
        "  "
        + "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        ).rstrip()
        for r in rows
    ]
    out = [head, "", *table]
    if isinstance(stats_at, int | float):
        out += [
            "",
            "note: the run stopped without its final statistics: these are from "
            f"{fmt_duration(stats_at)} in",
        ]
    advice = view.recommendation()
    if advice:
        out += ["", *textwrap.wrap(advice, 96, subsequent_indent="  ", break_on_hyphens=False)]
    if report_path:
        out += [f"report: {report_path}"]
    return "\n".join(out)


def _demo_script() -> Path:
    """examples/scraper.py of the source checkout pipeflow is installed from."""
    path = Path(__file__).resolve().parent.parent / "examples" / "scraper.py"
    if not path.is_file():
        raise CliError(
            "pipeflow demo runs examples/scraper.py from a source checkout, and none is "
            "next to this installation (clone the repository and pip install -e '.[http]')"
        )
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    """The first thing a newcomer runs: the seed's web scraper on a local site."""
    path = _demo_script()
    spec = importlib.util.spec_from_file_location("pipeflow_demo_scraper", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise CliError(
            f"pipeflow demo needs {exc.name or 'an optional dependency'}: pip install -e '.[http]'"
        ) from None
    mode = "live" if sys.stdout.isatty() else "lines"
    progress = _Progress(sys.stdout, mode=mode, title="pipeflow demo: web scraper")
    series = Series(interval=1.0)

    async def watch(pipeline: Pipeline[Any, Any]) -> None:
        t0 = trio.current_time()
        next_sample = 1.0
        k = 0
        try:
            while True:
                k += 1
                await trio.sleep_until(t0 + k * 0.25)
                stats = pipeline.current_stats()
                if stats is None:
                    continue
                t = trio.current_time() - t0
                if t >= next_sample - 1e-9:
                    series.sample(t, stats)
                    next_sample += 1.0
                progress.update(t, stats, series)
        finally:
            progress.close()

    # pipeflow's warnings (the site's 404 and 500 pages) print above the live view.
    logger = logging.getLogger("pipeflow")
    handler = _LogHandler(progress)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        module.main(["--pages", str(args.pages)], watch=watch)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    return _RunCommand(args)()
