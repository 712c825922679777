"""The ``pipeflow`` command's parser and entry point."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Sequence
from fractions import Fraction

from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, _Parser, error
from .signals import CommandSignals, Stopped

# The commands are imported by build_parser(), once main() handles SIGINT and SIGTERM:
# a signal during their imports is then one line, not a traceback.


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .args import (
        _host,
        _interval,
        _port,
        _positive_int,
        _seconds,
        instances,
        parse_headroom,
        parse_latency,
        parse_rate,
        parse_utilisation,
    )
    from .demo import cmd_demo
    from .graph import FORMATS, cmd_graph
    from .plugins import cmd_plugins
    from .run import cmd_run
    from .size import cmd_size

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
        "--metrics-host",
        metavar="HOST",
        type=_host,
        help="the address the metrics listen on (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    run.add_argument(
        "--metrics-linger",
        metavar="S",
        type=_seconds,
        default=0.0,
        help="keep serving the metrics for S seconds after the run (its last figures reach "
        "Prometheus; Ctrl+C ends it early)",
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
        "after",
        metavar="AFTER",
        nargs="?",
        help="a second report: compare the run of TARGET with this one (did the advice hold?)",
    )
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
        help="time per item W, your P99, with its unit: 80ms or 0.08s",
    )
    size.add_argument(
        "--instances", type=instances, default=1, metavar="K", help="default 1 (at most 1,000,000)"
    )
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
    its exit status.

    SIGINT and SIGTERM are handled from the start (a signal while the command starts is
    one line and exit status 128 + N; see ``signals.py``). Called without ``argv`` (the
    process's own command), the handler stays when it returns: a signal as the process
    exits ends it at once with the command's exit status, rather than by a death by the
    signal or a traceback; with ``argv`` the handlers found are put back.
    """
    signals = CommandSignals()
    if signals.install() and argv is None:
        # Registered first, so run last of the exit's callbacks.
        atexit.register(signals.ignore)
    status = EXIT_FAILED
    try:
        status = _main(argv, signals)
        return status
    finally:
        if argv is not None:
            signals.restore()
        else:
            signals.exiting(status)


def _main(argv: Sequence[str] | None, signals: CommandSignals) -> int:
    # The interpreter's last garbage collections, on the way out, walk every object the
    # command loaded: 0.3-0.7 s on a loaded 2-core machine, after the run has ended (a
    # Ctrl+C then takes that much longer to exit). Frozen objects are not walked; the
    # process is ending, so nothing is lost but the wait (atexit runs it last).
    try:
        atexit.register(gc.freeze)
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version print and "exit" 0
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if args.command is None:
            raise CliError(
                "a command is required: run, graph, size, plugins or demo (see pipeflow --help)"
            )
        if args.command == "run":
            args.signals = signals  # the run command takes them over (see run.py)
        elif args.command == "plugins":
            # A Ctrl+C is then a Stopped, told apart from a plugin that raises
            # KeyboardInterrupt on import (see plugins.py).
            args.signals = signals
        else:
            # The other commands end on Ctrl+C as Python does (a KeyboardInterrupt).
            signals.restore()
        status: int = args.func(args)
        return status
    except CliError as exc:
        error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        signum = exc.signal if isinstance(exc, Stopped) else signal.SIGINT
        when = " while starting" if isinstance(exc, Stopped) else ""
        print(f"pipeflow: stopped by {signal.Signals(signum).name}{when}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # The reader went away (`pipeflow graph ... | head`): not an error worth a
        # traceback. Point stdout at devnull so the interpreter's final flush is quiet.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
