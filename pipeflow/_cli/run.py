"""``pipeflow run``: a pipeline over the lines of a file, with a live view and a report."""

from __future__ import annotations

import argparse
import codecs
import gc
import inspect
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from .._errors import StageError
from .._report import Series, build_report, describe_pipeline, result_dict_from_stats
from .._stats import StageStats, find_bottleneck
from .errors import EXIT_FAILED, EXIT_OK, CliError, one_line
from .loading import load_pipeline
from .progress import LogHandler, Progress
from .signals import CommandSignals
from .summary import summary


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
    # The pieces of the line not finished yet, joined once its newline comes: adding
    # each chunk to it instead would copy a long line again for every chunk (a line of
    # 32 MB took a minute).
    pending: list[str] = []
    offset = 0  # bytes read so far
    try:
        while True:
            chunk = await read()
            # The decoder holds back the bytes of an incomplete character; an error's
            # start counts from the first of them, which ``offset`` already passed.
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                msg = f"{where} is not UTF-8 text (byte {offset - held + exc.start})"
                raise InputError(msg) from None
            offset += len(chunk)
            if "\n" not in text:
                if text:
                    pending.append(text)
            else:
                *lines, rest = text.split("\n")
                if pending:
                    pending.append(lines[0])
                    lines[0] = "".join(pending)
                    pending.clear()
                if rest:
                    pending.append(rest)
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
            yield "".join(pending).removesuffix("\r")
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


class _AddressSeen(trio.abc.Instrument):
    """Notes ``pipeline.metrics_address`` the moment the run's endpoint sets it, then
    stops looking. Polling for it would miss the endpoint of a run that ends within a
    poll (a few milliseconds): it is unset again when the run ends."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.address: tuple[str, int] | None = None
        self._installed = True

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        address = getattr(self.pipeline, "metrics_address", None)
        if address:
            self.address = (str(address[0]), int(address[1]))
            self.remove()

    def remove(self) -> None:
        if self._installed:
            self._installed = False
            trio.lowlevel.remove_instrument(self)


@attrs.define
class _Outcome:
    result: Any = None
    error: BaseException | None = None
    stats: Mapping[str, StageStats] | None = None
    stats_at: float = 0.0  # when ``stats`` was sampled
    elapsed: float = 0.0
    signal: int | None = None


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
            if args.metrics_host not in (None, "127.0.0.1"):
                self.kwargs["metrics_host"] = args.metrics_host
        elif args.metrics_linger:
            raise CliError("--metrics-linger needs --metrics-port: there is no endpoint to keep")
        elif args.metrics_host is not None:
            raise CliError("--metrics-host needs --metrics-port: there is no endpoint to listen")
        if args.report:
            _check_report_path(args.report)
        # Last: the source may print a notice, which must not precede an error line.
        self.source = self._source()
        self.series = Series(interval=1.0)
        mode = "off" if args.quiet else ("live" if sys.stdout.isatty() else "lines")
        self.progress = Progress(sys.stdout, mode=mode, title=f"pipeflow run {self.target}")
        self.outcome = _Outcome()
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.metrics_url: str | None = None
        self.metrics_address: tuple[str, int] | None = None
        # main()'s handler of SIGINT and SIGTERM, if it has one (see signals.py): the run
        # takes it over, from just before trio.run until the report is written.
        signals: CommandSignals | None = getattr(args, "signals", None)
        self.signals = signals if signals is not None and signals.installed else None

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
                f"(pip install 'pipeflow-trio[redis]'): {exc}"
            ) from None
        try:
            return RedisStreamSource.from_url(url)
        except (ValueError, TypeError) as exc:
            raise CliError(f"--source: {exc}") from None

    # -- inside trio.run --

    async def execute(self) -> None:
        self.t0 = trio.current_time()
        self.cpu0 = time.process_time()
        signals = self.signals
        if signals is None:
            await self._execute()
            return
        # A signal from now until the run's gate is installed is handed to it; one that
        # came before is not lost: the run does not start.
        signals.connect(trio.lowlevel.current_trio_token())
        try:
            if signals.first is not None:
                self.outcome.error = KeyboardInterrupt()
                self.outcome.signal = signals.first
                return
            await self._execute()
        finally:
            signals.disconnect()

    async def _execute(self) -> None:
        seen = _AddressSeen(self.pipeline) if "metrics_port" in self.kwargs else None
        if seen is not None:
            trio.lowlevel.add_instrument(seen)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, seen)
            try:
                self.outcome.result = await self.pipeline.arun(self.source, **self.kwargs)
            except BaseException as exc:
                # A KeyboardInterrupt here is pipeflow.Interrupted: the run drained after
                # a signal and carries its partial result. Anything else the run raised
                # (a stage's sys.exit() too) is its failure, reported like any other.
                if _contains(exc, trio.Cancelled):
                    raise
                if (
                    not isinstance(exc, KeyboardInterrupt)
                    and _contains(exc, KeyboardInterrupt)
                    and not self._own_signals()
                ):
                    # Ctrl+C without graceful shutdown in the core, inside a group. (With
                    # it, the user's signal is pipeflow.Interrupted: a KeyboardInterrupt
                    # in a group is one a stage raised, a failure like any other.)
                    exc, self.outcome.signal = KeyboardInterrupt(), signal.SIGINT
                self.outcome.error = exc
            finally:
                self.outcome.elapsed = trio.current_time() - self.t0
                nursery.cancel_scope.cancel()
                if seen is not None:
                    seen.remove()
                    # A run shorter than a poll of _watch: its endpoint came and went.
                    self._announce_metrics(seen.address)

    def _own_signals(self) -> bool:
        """Whether the run's gate takes SIGINT and SIGTERM (and no signal came before)."""
        received = self.signals is not None and self.signals.first is not None
        return bool(self.kwargs.get("handle_signals")) and not received

    async def _watch(self, seen: _AddressSeen | None) -> None:
        tick = self.TICK_LIVE if self.progress.mode == "live" else 1.0
        if seen is not None:
            # Say where the metrics are as soon as the endpoint listens (an instrument
            # notes it: an instrument's hook may not wake a task, so it is polled).
            while seen.address is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
            self._announce_metrics(seen.address)
        next_sample = 1.0
        k = 0
        while True:
            k += 1
            await trio.sleep_until(self.t0 + k * tick)
            stats = self.pipeline.current_stats()
            if stats is None:
                continue
            t = trio.current_time() - self.t0
            self.outcome.stats, self.outcome.stats_at = stats, t
            if t >= next_sample - 1e-9:
                self.series.sample(t, stats, time.process_time() - self.cpu0)
                next_sample += 1.0
            self.progress.update(t, stats, self.series, self.pipeline.current_workers())

    def _announce_metrics(self, address: tuple[str, int] | None) -> None:
        if address is None or self.metrics_url is not None:
            return
        host, port = address
        self.metrics_address = (host, port)
        self.metrics_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
        self.progress.clear()
        print(f"pipeflow: serving metrics at {self.metrics_url}", file=sys.stderr, flush=True)
        self.progress.redraw()

    # -- after --

    def __call__(self) -> int:
        try:
            return self._call()
        finally:
            self._close_handoff()

    def _call(self) -> int:
        logger = logging.getLogger("pipeflow")
        handler = LogHandler(self.progress)
        saved = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if self.args.verbose else logging.WARNING)
        logger.propagate = False
        # What is loaded now (the modules, the pipeline) outlives the run: frozen for the
        # run's length, it is not walked again by every full collection (about 50 ms each
        # in a fleet member, one every few thousand entries).
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        if self.signals is not None:
            if self.native_signals:
                # From here until the report is written a signal is noted, never fatal:
                # outside the run's own gate (which puts this handler back when the run
                # ends) it would otherwise be Python's default (a traceback, or death by
                # SIGTERM) while the summary and report are being written.
                self.signals.hold()
            else:
                self.signals.restore()  # Ctrl+C is a KeyboardInterrupt, as before
                self.signals = None
        if self.args.metrics_linger > 0:
            # The run's endpoint leaves its listening sockets here for the linger: the
            # port keeps listening from the run to the linger (a scrape in between waits
            # in the backlog instead of being refused).
            self.pipeline._metrics_handoff = []
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
            if freeze:
                gc.unfreeze()
            self.progress.close()
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
        code = self._finish()
        interrupted = isinstance(self.outcome.error, KeyboardInterrupt)
        signalled = self.signals is not None and self.signals.first is not None
        if (
            self.args.metrics_linger > 0
            and self.metrics_address is not None
            and not (interrupted or signalled)
        ):
            trio.run(self._linger)
        return code

    def _close_handoff(self) -> None:
        """Close the listening sockets the run's endpoint left for a linger that did not
        take them (an interrupted run, an error)."""
        handoff = self.pipeline._metrics_handoff
        self.pipeline._metrics_handoff = None
        if handoff:
            from .._metrics import close_listeners

            close_listeners(handoff)

    async def _linger(self) -> None:
        """``--metrics-linger S``: serve the finished run's metrics for S more seconds
        (Ctrl+C or SIGTERM ends it at once), so that Prometheus scrapes the last figures
        of a run that ends (a batch job) before the target goes away."""
        from .._metrics import linger_metrics

        assert self.metrics_address is not None
        host, port = self.metrics_address
        seconds = self.args.metrics_linger

        def listening() -> None:
            # Said once it listens again, so that a scrape prompted by it gets an answer.
            if not self.args.quiet:
                print(
                    f"pipeflow: still serving metrics at {self.metrics_url} for {seconds:g}s "
                    f"(Ctrl+C to stop)",
                    file=sys.stderr,
                    flush=True,
                )

        taken = await linger_metrics(
            self.pipeline,
            host,
            port,
            seconds,
            signals=_in_main_thread(),
            listening=listening,
            listeners=self.pipeline._metrics_handoff,
        )
        if taken is not None:  # the port was taken meanwhile
            print(f"pipeflow: --metrics-linger: {taken}", file=sys.stderr, flush=True)

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
            # (Its message names the address; the errno adds nothing for a reader.)
            host = self.kwargs.get("metrics_host")
            given = f" --metrics-host {host}" if host else ""
            raise CliError(f"--metrics-port {self.args.metrics_port}{given}: {err.strerror or err}")
        elif isinstance(err, InputError):
            raise CliError(str(err))
        elif isinstance(err, StageError):
            status, failure, code = "failed", _describe(err), EXIT_FAILED
            # The core attaches the stopped run's result (its final statistics) to a
            # fail-fast error; without it, the last sample is all there is.
            result = err.result
        elif err is not None:
            status, failure, code = "failed", _describe(err), EXIT_FAILED
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
        if result is not None:
            # The final figures: a new last sample, or they replace one taken as the run
            # ended (the two clocks started a moment apart).
            self.series.sample(
                max(t_end, self.series.t[-1] if self.series.t else 0.0),
                result.stats,
                time.process_time() - self.cpu0,
            )
        if status == "completed" and data.get("errors"):
            n = len(data["errors"])
            failure = f"{n} item{'s' if n != 1 else ''} failed; first: {data['errors'][0]}"
            code = EXIT_FAILED
        report = build_report(
            target=self.target,
            status=status,
            result=data,
            structure=describe_pipeline(self.pipeline, source=self.source),
            series=self.series,
            failure=failure,
            signal=signal.Signals(signum).name if signum else None,
            stats_at=stats_at,
            stalls=self.progress.stalls(),
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
            print(f"pipeflow: {label}: {one_line(failure)}", file=sys.stderr)
        elif status == "interrupted":
            name = signal.Signals(signum).name if signum else "signal"
            print(f"pipeflow: stopped by {name}", file=sys.stderr)
        late = self.signals.first if self.signals is not None else None
        if status != "interrupted" and late is not None and code == EXIT_OK:
            # A signal as the run ended on its own (its report says so): the command
            # was still told to stop, and says it with its exit status.
            name = signal.Signals(late).name
            print(f"pipeflow: stopped by {name} as the run ended", file=sys.stderr)
            code = 128 + late
        return code


def _describe(err: BaseException) -> str:
    """A run's failure on one line: the exception (the first, if several were raised
    together) and its notes, which say where it happened (``stage 'store': its resource
    ... failed to open``)."""
    leaves = _leaves(err)
    first = leaves[0]
    if isinstance(first, StageError):
        text = str(first)
    else:
        text = f"{type(first).__name__}: {first}" if str(first) else type(first).__name__
    notes = [str(n) for n in getattr(first, "__notes__", None) or () if str(n).strip()]
    if notes:
        text += f" ({'; '.join(notes)})"
    if len(leaves) > 1:
        text += f" (and {len(leaves) - 1} more)"
    return text


def _leaves(err: BaseException) -> list[BaseException]:
    if isinstance(err, BaseExceptionGroup):
        return [leaf for e in err.exceptions for leaf in _leaves(e)] or [err]
    return [err]


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


def cmd_run(args: argparse.Namespace) -> int:
    return _RunCommand(args)()
