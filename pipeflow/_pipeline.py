"""``Pipeline``: run a chain of stages over a source, four ways.

- :meth:`Pipeline.run` — blocking, from synchronous code (calls ``trio.run``);
- :meth:`Pipeline.arun` — the same from Trio code;
- :meth:`Pipeline.stream` — outputs as they are produced, inside ``async with``;
- :meth:`Pipeline.open` — a long-lived pipeline fed by the caller, with the three entry
  strategies (block, reject, drop).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

import attrs
import trio

from ._chain import Chain
from ._errors import Interrupted, PipelineClosed, PipelineFull, StageError
from ._process import check_picklable
from ._run import Env, Outlet, Run, Service, SignalGate, running
from ._run.edge import CHUNK
from ._run.forensics import WorkerStatus, run_worker_statuses
from ._sources import SourceLedger
from ._stage import Stage
from ._stats import StageCounters, StageSample, StageStats, accumulate, find_bottleneck

In = TypeVar("In")
Out = TypeVar("Out")


@attrs.frozen(kw_only=True)
class RunResult(Generic[Out]):
    """What a run produced and how it went.

    ``outputs``: the last stage's outputs (empty with ``collect=False``); ``errors``: the
    :class:`StageError` of every item that failed under ``errors="collect"``; ``stats``:
    stage name → :class:`StageStats`; ``elapsed``: seconds on Trio's clock;
    ``bottleneck``: the stage that limited throughput (the busiest), or None;
    ``unfinished``: ``(stage, item)`` for every item a stop (a failure, a signal past its
    grace period, a cancellation, leaving ``stream()``/``open()`` early) took from a
    worker or from the queue in front of a stage, so that a caller can resume them;
    ``unread``: the outputs the last stage made that the reader of ``stream()`` had not
    taken when its block ended (left early, cancelled, a failure), in order; for
    ``open(outputs=True)``, those a stop kept from reaching ``flow.outputs`` (the rest
    stay readable there after the block); empty after ``run()``/``arun()``, which keep
    every output. An acking source never acks their items.
    """

    pipeline: str
    outputs: list[Out]
    errors: list[StageError]
    stats: Mapping[str, StageStats]
    elapsed: float
    bottleneck: str | None
    unfinished: list[tuple[str, Any]] = attrs.field(factory=list)
    unread: list[Out] = attrs.field(factory=list)

    def raise_for_errors(self) -> None:
        """Raise the collected errors together as one ``ExceptionGroup``, if any."""
        if self.errors:
            n = len(self.errors)
            raise ExceptionGroup(
                f"{n} item{'s' if n != 1 else ''} failed in pipeline {self.pipeline!r}",
                self.errors,
            )

    def to_dict(self) -> dict[str, Any]:
        """The run report as plain data (JSON-ready), without the outputs: with what a
        stop left (``unfinished`` as ``{"stage", "item"}``, and the ``unread`` outputs),
        each item as it is if JSON takes it (a line of ``pipeflow run --input``), else
        its ``repr``, so that a stopped run's report says what to run again."""
        return {
            "pipeline": self.pipeline,
            "elapsed": self.elapsed,
            "bottleneck": self.bottleneck,
            "errors": [str(e) for e in self.errors],
            "stages": [s.to_dict() for s in self.stats.values()],
            "unfinished": [
                {"stage": stage, "item": _plain(item)} for stage, item in self.unfinished
            ],
            "unread": [_plain(out) for out in self.unread],
        }


def _plain(value: Any) -> Any:
    """``value`` if JSON can hold it as it is, else its ``repr``."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _result(run: Run) -> RunResult[Any]:
    stats = run.stats()
    return RunResult(
        pipeline=run.pipeline,
        outputs=run.outputs,
        errors=list(run.errors),
        stats=stats,
        elapsed=run.elapsed(),
        bottleneck=find_bottleneck(stats),
        unfinished=list(run.unfinished),
        unread=list(run.unread),
    )


def _check_source(source: object) -> None:
    if any(hasattr(source, a) for a in ("__aiter__", "__iter__", "__pipeflow_open__")):
        return
    msg = (
        f"source must be an iterable, an async iterable or a Trio receive channel, "
        f"got {source!r} ({type(source).__name__})"
    )
    raise TypeError(msg)


def _check_buffer(buffer: object, name: str) -> None:
    if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 0:
        raise ValueError(f"{name}= must be an int >= 0, got {buffer!r}")


def _check_grace(grace: object) -> None:
    if (
        not isinstance(grace, int | float)
        or isinstance(grace, bool)
        or not (grace >= 0 and math.isfinite(grace))
    ):
        raise ValueError(f"grace= must be a finite number of seconds >= 0, got {grace!r}")


def _refuse_inside_trio(pipeline: str) -> None:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return  # not inside Trio: run() may start it
    msg = (
        f"pipeline {pipeline!r}: run() starts Trio, but this code already runs inside "
        f"Trio; inside Trio, use `await pipeline.arun(...)`"
    )
    raise RuntimeError(msg)


def _require_trio(call: str) -> None:
    """``call`` (arun, stream, open) runs on Trio: awaited elsewhere (asyncio), say so
    rather than let Trio fail on a missing attribute."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        msg = (
            f"{call} must run inside Trio (trio.run), and this code is not (asyncio?); "
            f"from code that is not Trio's, call pipeline.run(...), which starts Trio"
        )
        raise RuntimeError(msg) from None


T = TypeVar("T")


class Opening(contextlib.AbstractAsyncContextManager[T]):
    """What :meth:`Pipeline.open` and :meth:`Pipeline.stream` return: an async context
    manager, to use with ``async with``. Reaching for what it yields without ``async
    with`` (``flow.send``, ``async for`` over it) raises an error that says how to write
    it, instead of an ``AttributeError`` about a private class."""

    __slots__ = ("_call", "_entered", "_manager", "_name")

    def __init__(
        self, manager: contextlib.AbstractAsyncContextManager[T], call: str, name: str
    ) -> None:
        self._manager = manager
        self._call = call  # "pipeline.open()"
        self._name = name  # "flow"
        self._entered = False

    async def __aenter__(self) -> T:
        _require_trio(f"async with {self._call}")
        if self._entered:
            # A run is entered once (its generator-based manager would fail with an
            # AttributeError from contextlib, nested or after the first block).
            msg = (
                f"this {self._call} was already entered: each `async with` runs the "
                f"pipeline once, so call {self._call} again for another run"
            )
            raise RuntimeError(msg)
        self._entered = True
        return await self._manager.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._manager.__aexit__(*exc_info)

    def _misused(self, what: str) -> str:
        return (
            f"{what}: {self._call} returns an async context manager, not the "
            f"{self._name}; use `async with {self._call} as {self._name}:` and use "
            f"{self._name} inside the block"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(self._misused(f"no attribute {name!r}"))

    def __aiter__(self) -> Any:
        raise TypeError(self._misused("cannot iterate with async for"))

    def __await__(self) -> Any:
        raise TypeError(self._misused("cannot await it"))


class Outputs(Generic[Out]):
    """The outputs of :meth:`Pipeline.stream` (or :meth:`Pipeline.open` with
    ``outputs=True``): ``async for out in outputs``; ``await outputs.receive()``.

    After the ``async with`` block, ``result`` holds the :class:`RunResult`, however the
    block ended.
    """

    def __init__(self, run: Run) -> None:
        self._run = run
        assert run.outlet_edge is not None
        self._edge = run.outlet_edge
        # Outputs taken from the outlet but not yet handed to the reader: the reader
        # takes what is waiting in one go, like every worker, and a checkpoint every
        # CHUNK outputs keeps it cancellable.
        self._taken: collections.deque[Env] = collections.deque()
        self._spins = 0
        self.ended = False
        self.result: RunResult[Out] | None = None

    async def receive(self) -> Out:
        """The next output; raises ``trio.EndOfChannel`` once the run has finished."""
        taken = self._taken
        if not taken:
            edge = self._edge
            try:
                got = edge.take_ready(CHUNK)
            except trio.EndOfChannel:
                self.ended = True
                self._run.outlet_drained.set()
                await trio.lowlevel.checkpoint()
                raise
            if not got:
                try:
                    got = await edge.take(CHUNK)
                except trio.EndOfChannel:
                    self.ended = True
                    self._run.outlet_drained.set()
                    raise
                self._spins = 0
            taken.extend(got)
        self._spins += 1
        if self._spins >= CHUNK:
            self._spins = 0
            await trio.lowlevel.checkpoint()
        env = taken.popleft()
        # The item has left the pipeline only now that someone has it: ack it now, so
        # outputs left unread by a reader that stopped are not acked.
        if env.ack is not None:
            env.ack.done()
        return env.item  # type: ignore[no-any-return]

    def __aiter__(self) -> Outputs[Out]:
        return self

    async def __anext__(self) -> Out:
        taken = self._taken
        if taken and self._spins < CHUNK - 1:
            # The common case, without a second coroutine: an output already taken.
            self._spins += 1
            env = taken.popleft()
            if env.ack is not None:
                env.ack.done()
            return env.item  # type: ignore[no-any-return]
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def stats(self) -> dict[str, StageStats]:
        """A live snapshot of every stage's statistics."""
        return self._run.stats()


class Flow(Generic[In, Out]):
    """A running pipeline fed by the caller (see :meth:`Pipeline.open`).

    Three entry strategies, the backpressure choices of a worker pool:

    - ``await flow.send(item)`` — *block* while the first stage's buffer is full;
    - ``flow.send_nowait(item)`` — *reject*: raise :class:`PipelineFull` at once;
    - ``flow.offer(item)`` — *drop*: return False and count the item as dropped.

    Once the run has stopped (a failure, a cancellation) or the input is closed, all
    three raise :class:`PipelineClosed` saying why.
    """

    def __init__(self, run: Run) -> None:
        self._run = run
        first = run.stages[0]
        self._first = first
        self._edge = first.inbox
        self._edge.add_sender()
        self._closed = False
        # Why the input is closed, for PipelineClosed (a feeder outside the block).
        self._closed_by = "its input is closed (flow.close(), or the end of the async with block)"
        self.outputs: Outputs[Out] | None = Outputs(run) if run.outlet_edge is not None else None
        self.result: RunResult[Out] | None = None
        # send() calls made and sends that started: a difference at the end of the block
        # is a `flow.send(item)` without `await` (its coroutine never ran).
        self._sends_created = 0
        self._sends_started = 0

    def _check_open(self) -> None:
        run = self._run
        if run.first_failure is not None:
            why = f"it stopped on a failure: {run.first_failure}"
        elif self._closed:
            why = self._closed_by
        elif self._edge.broken:
            why = "it was cancelled"
        else:
            return
        raise PipelineClosed(f"pipeline {run.pipeline!r} takes no more items: {why}")

    def send(self, item: In) -> Coroutine[Any, Any, None]:
        """Put an item in, waiting while the pipeline is full (backpressure):
        ``await flow.send(item)``."""
        self._sends_created += 1
        return self._send(item)

    async def _send(self, item: In) -> None:
        self._sends_started += 1
        self._check_open()
        env = Env(item)
        try:
            await self._edge.put([env])
        except trio.BrokenResourceError:
            # Refused, not taken: the caller keeps the item (it is told so), so the run
            # does not count it or list it as unfinished, as it does an item that a
            # stop cut on its way in.
            stranded = self._edge.stranded
            for i in range(len(stranded) - 1, -1, -1):
                if stranded[i] is env:
                    del stranded[i]
                    break
            self._check_open()
            raise PipelineClosed(
                f"pipeline {self._run.pipeline!r} takes no more items: it was cancelled"
            ) from None

    # Python's own warning for a never-awaited send names the method the user called.
    _send.__name__ = "send"
    _send.__qualname__ = "Flow.send"

    def send_nowait(self, item: In) -> None:
        """Put an item in or raise :class:`PipelineFull` at once (answer 429)."""
        self._check_open()
        try:
            self._edge.put_nowait(Env(item))
        except trio.WouldBlock:
            first = self._first
            cap = first.opts.buffer_size
            msg = (
                f"pipeline {self._run.pipeline!r} is full: stage {first.name!r} has "
                f"{cap} queued item{'s' if cap != 1 else ''} and every worker busy"
            )
            raise PipelineFull(msg) from None

    def offer(self, item: In) -> bool:
        """Put an item in if there is room; otherwise drop it, count it, return False."""
        self._check_open()
        try:
            self._edge.put_nowait(Env(item))
        except trio.WouldBlock:
            c = self._first.c
            c.items_in += 1
            c.dropped += 1
            return False
        return True

    def _block_ended_by(self, exc: BaseException) -> None:
        """The ``async with`` block ended with ``exc``: what a feeder is told then."""
        if not self._closed:
            if isinstance(exc, trio.Cancelled) or (
                isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
            ):
                self._closed_by = "the async with block was cancelled"
            else:
                self._closed_by = f"the async with block ended with {exc!r}"

    def close(self) -> None:
        """End the input: accepted items still run to the end. Leaving the block does it."""
        if not self._closed:
            self._closed = True
            self._edge.sender_done()

    def stats(self) -> dict[str, StageStats]:
        """A live snapshot of every stage's statistics."""
        return self._run.stats()


class Pipeline(Generic[In, Out]):
    """A chain of stages, ready to run over any number of sources.

    >>> result = Pipeline(double | keep_even).run(range(10))   # doctest: +SKIP

    ``name`` labels logs and metrics; ``dead_letter`` is the default dead-letter sink of
    stages that set none; ``max_failures`` is an error budget for the whole run (items
    failed under ``collect``/``skip`` in any stage; one more stops the run with
    :class:`TooManyFailures`); ``registry`` is a ``prometheus_client.CollectorRegistry``
    to publish metrics in.
    """

    @overload
    def __init__(
        self: Pipeline[In, Out],
        stages: Stage[In, Out] | Chain[In, Out],
        *,
        name: str | None = None,
        registry: Any = None,
        dead_letter: Any = None,
        max_failures: int | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        stages: object,
        *,
        name: str | None = None,
        registry: Any = None,
        dead_letter: Any = None,
        max_failures: int | None = None,
    ) -> None: ...
    def __init__(
        self,
        stages: object,
        *,
        name: str | None = None,
        registry: Any = None,
        dead_letter: Any = None,
        max_failures: int | None = None,
    ) -> None:
        if isinstance(stages, Stage):
            chain: tuple[Stage[Any, Any], ...] = (stages,)
        elif isinstance(stages, Chain):
            chain = stages.stages
        else:
            msg = (
                f"Pipeline() takes a stage or a chain of stages joined with |, "
                f"got {stages!r} ({type(stages).__name__})"
            )
            raise TypeError(msg)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"Pipeline name= must be a non-empty str, got {name!r}")
        self.name = name if name is not None else "pipeline"
        seen: dict[str, int] = {}
        for i, st in enumerate(chain):
            if st.name in seen:
                msg = (
                    f"pipeline {self.name!r}: stages {seen[st.name] + 1} and {i + 1} are "
                    f"both named {st.name!r}; stage names must be unique "
                    f"(use stage.with_options(name=...))"
                )
                raise ValueError(msg)
            seen[st.name] = i
            if st.options.run_in == "process":
                # Refuse what cannot cross a process boundary now, not at the first item.
                check_picklable(st._target(), st.name)
        if dead_letter is not None and not (
            callable(dead_letter) or isinstance(dead_letter, Stage)
        ):
            msg = f"Pipeline dead_letter= must be a callable or a Stage, got {dead_letter!r}"
            raise TypeError(msg)
        if max_failures is not None:
            if not isinstance(max_failures, int) or isinstance(max_failures, bool):
                msg = f"Pipeline max_failures= must be an int >= 0, got {max_failures!r}"
                raise TypeError(msg)
            if max_failures < 0:
                msg = f"Pipeline max_failures= must be an int >= 0, got {max_failures!r}"
                raise ValueError(msg)
        for st in chain:
            sink = st.options.dead_letter if st.options.dead_letter is not None else dead_letter
            if isinstance(sink, Stage) and sink.name in seen:
                msg = (
                    f"pipeline {self.name!r}: the dead-letter stage of {st.name!r} is named "
                    f"{sink.name!r}, like a stage of the pipeline; give it another name"
                )
                raise ValueError(msg)
        self.max_failures = max_failures
        self.stages = chain
        self.dead_letter = dead_letter
        self._live: list[Run] = []
        #: ``(host, port)`` of the metrics endpoint while a run serves one, else None.
        self.metrics_address: tuple[str, int] | None = None
        # Counters of finished runs, added up, so that metrics only ever go up.
        self._totals = {st.name: StageCounters(st.name) for st in chain}
        # The acking sources runs have read (their statistics, for the metrics).
        self._sources = SourceLedger()
        # Where a run's metrics endpoint leaves its listening sockets for a linger to
        # serve on (metrics_service's handoff), when the CLI will linger after the run
        # (``--metrics-linger``); ``arun`` passes a list of its own.
        self._metrics_handoff: list[trio.SocketListener] | None = None
        self.registry = registry
        if registry is not None:
            from ._metrics import register

            register(self, registry)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: " + " | ".join(s.name for s in self.stages) + ">"

    def _new_run(self, outlet: Outlet, *, outlet_buffer: int = 0) -> Run:
        return Run(
            self.stages,
            pipeline=self.name,
            outlet=outlet,
            dead_letter=self.dead_letter,
            outlet_buffer=outlet_buffer,
            max_failures=self.max_failures,
        )

    @contextlib.asynccontextmanager
    async def _running(
        self,
        run: Run,
        metrics_port: int | None,
        services: Sequence[Service] = (),
        *,
        metrics_host: str = "127.0.0.1",
        source: object = None,
        handoff: list[trio.SocketListener] | None = None,
    ) -> AsyncIterator[trio.Nursery]:
        services = list(services)
        if metrics_port is not None:
            from ._metrics import metrics_service

            if handoff is None:
                handoff = self._metrics_handoff
            services.append(
                metrics_service(
                    self, metrics_port, host=metrics_host, source=source, handoff=handoff
                )
            )
        self._sources.note(source)
        self._live.append(run)
        try:
            async with running(run, services) as nursery:
                yield nursery
        finally:
            self._live.remove(run)
            for sr in run.stages:
                accumulate(self._totals[sr.name], sr.c)

    def samples(self) -> dict[str, StageSample]:
        """Every stage's figures for an exporter, by stage name: the counts over the
        pipeline's life (finished runs and those in progress) and the gauges now. The
        Prometheus metrics are made from these; read them to feed another system."""
        live = list(self._live)
        out = {}
        for i, st in enumerate(self.stages):
            sample = StageSample.of(self._totals[st.name])
            for run in live:
                sample = sample + run.stages[i].sample(run.now())
            out[st.name] = sample
        return out

    def current_stats(self) -> dict[str, StageStats] | None:
        """A live snapshot of the run in progress (the latest, if several), or None."""
        return self._live[-1].stats() if self._live else None

    def current_workers(self) -> list[WorkerStatus] | None:
        """What each worker of the run in progress (the latest, if several) is doing now,
        stage by stage, or None: waiting for input, calling which item (stalled or not),
        throttled, sending. A goroutine profile for the pipeline::

            for w in pipeline.current_workers() or []:
                print(w.stage, w.worker, w.state, f"{w.seconds:.1f}s", w.item or "")
        """
        return run_worker_statuses(self._live[-1]) if self._live else None

    # -- the four ways in ----------------------------------------------------------------

    def run(
        self,
        source: Iterable[In] | Any,
        *,
        collect: bool = True,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_linger: float = 0.0,
        grace: float = 10.0,
        handle_signals: bool = True,
    ) -> RunResult[Out]:
        """Run the pipeline over ``source`` to the end and return the :class:`RunResult`.

        Blocks (calls ``trio.run``). ``source`` is an iterable, async iterable or Trio
        receive channel, consumed lazily. With ``collect=False`` no outputs are kept, for
        endless or huge streams. Raises :class:`StageError` on a fail-fast failure.

        Ctrl+C or SIGTERM stops the input and lets in-flight items finish for up to
        ``grace`` seconds, then cancels (a second signal cancels at once), and raises
        :class:`Interrupted` (a ``KeyboardInterrupt``) carrying the partial result.

        ``metrics_linger`` keeps the metrics endpoint serving the finished run's final
        figures for that many seconds more (a signal ends it at once), so that
        Prometheus scrapes a short run's last figures; not after an interrupted run.
        """
        _check_source(source)
        _refuse_inside_trio(self.name)
        run_it = functools.partial(
            self._arun,
            source,
            collect=collect,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            metrics_linger=metrics_linger,
            grace=grace,
        )
        if not (handle_signals and threading.current_thread() is threading.main_thread()):
            return trio.run(run_it)
        # The gate is held around trio.run, so a second Ctrl+C while the run tears down
        # is part of the same stop rather than a KeyboardInterrupt that loses the result.
        with SignalGate() as gate:
            return trio.run(functools.partial(run_it, signals=gate))

    async def arun(
        self,
        source: Iterable[In] | Any,
        *,
        collect: bool = True,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_linger: float = 0.0,
        grace: float = 10.0,
        handle_signals: bool = False,
    ) -> RunResult[Out]:
        """:meth:`run` for Trio code: ``result = await pipeline.arun(source)``.

        ``metrics_port`` serves Prometheus metrics for the run's lifetime, on
        ``metrics_host`` (127.0.0.1 by default; ``"0.0.0.0"`` to be scraped from
        another machine), and ``metrics_linger`` seconds more after the run ends.
        ``handle_signals=True`` handles SIGINT / SIGTERM as :meth:`run` does (main
        thread only).
        """
        _require_trio("pipeline.arun(...)")
        gate = SignalGate() if handle_signals else contextlib.nullcontext()
        with gate as signals:
            return await self._arun(
                source,
                collect=collect,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                metrics_linger=metrics_linger,
                grace=grace,
                signals=signals,
            )

    async def _arun(
        self,
        source: Iterable[In] | Any,
        *,
        collect: bool,
        metrics_port: int | None,
        metrics_host: str,
        grace: float,
        signals: SignalGate | None = None,
        metrics_linger: float = 0.0,
    ) -> RunResult[Out]:
        _check_source(source)
        _check_grace(grace)
        if metrics_linger != 0:
            from ._metrics import check_metrics_linger, linger_metrics

            metrics_linger = check_metrics_linger(self, metrics_linger, metrics_port)
        run = self._new_run("collect" if collect else "drop")
        address: tuple[str, int] | None = None
        failed: Exception | None = None
        # The run's listening sockets, kept open for the linger (see metrics_service).
        handoff: list[trio.SocketListener] | None = [] if metrics_linger else None
        try:
            with signals.connected(run, grace) if signals else contextlib.nullcontext():
                try:
                    async with self._running(
                        run, metrics_port, metrics_host=metrics_host, source=source, handoff=handoff
                    ) as nursery:
                        address = self.metrics_address
                        run.start_source(nursery, source)
                except StageError as failure:
                    # The statistics of a failed run are worth having (the CLI's report).
                    failure.result = _result(run)
                    failed = failure
                except Exception as failure:
                    # Failed otherwise (the source raised): lingers all the same, then
                    # raises.
                    if not metrics_linger or address is None:
                        raise
                    failed = failure
                result = _result(run)
            if metrics_linger and address is not None and run.interrupted_by is None:
                await linger_metrics(
                    self,
                    metrics_host,
                    address[1],
                    metrics_linger,
                    signals=signals is not None,
                    listeners=handoff,
                )
        finally:
            if handoff:  # not lingered on (an interrupted run): closed now
                from ._metrics import close_listeners

                close_listeners(handoff)
        if failed is not None:
            raise failed
        if run.interrupted_by is not None:
            raise Interrupted(run.interrupted_by, result)
        return result

    def stream(
        self,
        source: Iterable[In] | Any,
        *,
        buffer: int = CHUNK,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> Opening[Outputs[Out]]:
        """Outputs as they are produced::

            async with pipeline.stream(urls) as outputs:
                async for page in outputs:
                    ...

        Leaving the block before the end cancels the pipeline cleanly; a failure in the
        pipeline cancels the block and is raised from it. ``outputs.result`` holds the
        :class:`RunResult` after the block, however it ended. ``buffer`` is how many
        outputs may wait for the reader (32 by default, so that the last stage hands
        them over in chunks; ``buffer=0`` makes each output wait for the reader).
        """
        manager = self._stream(
            source, buffer=buffer, metrics_port=metrics_port, metrics_host=metrics_host
        )
        return Opening(manager, "pipeline.stream(source)", "outputs")

    @contextlib.asynccontextmanager
    async def _stream(
        self, source: Any, *, buffer: int, metrics_port: int | None, metrics_host: str
    ) -> AsyncIterator[Outputs[Out]]:
        _check_source(source)
        _check_buffer(buffer, "buffer")
        run = self._new_run("channel", outlet_buffer=buffer)
        outputs: Outputs[Out] | None = None
        try:
            async with self._running(
                run, metrics_port, metrics_host=metrics_host, source=source
            ) as nursery:
                run.start_source(nursery, source)
                outputs = Outputs(run)
                try:
                    yield outputs
                finally:
                    # A reader that left early: the main stages and any dead-letter
                    # stage. Not after a fail-fast failure, which stopped the main stages
                    # itself: the dead-letter stages take what it gave them, as in run().
                    if not outputs.ended and run.first_failure is None:
                        run.cancel()
                    # The reader takes no more: an acking source's task, which waits for
                    # the outputs to be read before it lets go of its items, waits no
                    # longer (after a fail-fast failure it waited for ever).
                    run.outlet_drained.set()
        except StageError as failure:
            if outputs is not None:
                run.collect_unread(outputs._taken)
            failure.result = _result(run)
            raise
        finally:
            if outputs is not None:
                run.collect_unread(outputs._taken)
                outputs.result = _result(run)

    def open(
        self,
        *,
        outputs: bool = False,
        output_buffer: int = CHUNK,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> Opening[Flow[In, Out]]:
        """A long-lived pipeline fed by the caller::

            async with pipeline.open() as flow:
                await flow.send(item)        # block while full
                flow.send_nowait(item)       # or raise PipelineFull (HTTP 429)
                flow.offer(item)             # or drop and count (telemetry)

        Leaving the block ends the input and waits until every accepted item has left
        the pipeline. The last stage's outputs are discarded unless ``outputs=True``;
        then ``flow.outputs`` must be read (in another task) as they come, with
        backpressure: an unread output holds up the pipeline (and leaving the block
        waits for it), so a reader that stops early should cancel the block instead.
        ``flow.result`` holds the :class:`RunResult` after the block, however it ended.
        A ``flow.send(item)`` that was never awaited is reported when the block ends.
        """
        manager = self._open(
            outputs=outputs,
            output_buffer=output_buffer,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
        return Opening(manager, "pipeline.open()", "flow")

    @contextlib.asynccontextmanager
    async def _open(
        self, *, outputs: bool, output_buffer: int, metrics_port: int | None, metrics_host: str
    ) -> AsyncIterator[Flow[In, Out]]:
        _check_buffer(output_buffer, "output_buffer")
        run = self._new_run("channel" if outputs else "drop", outlet_buffer=output_buffer)
        flow: Flow[In, Out] | None = None
        try:
            async with self._running(run, metrics_port, metrics_host=metrics_host):
                flow = Flow(run)
                try:
                    yield flow
                except BaseException as exc:
                    flow._block_ended_by(exc)
                    raise
                finally:
                    flow.close()
        except StageError as failure:
            run.collect_unread(queued=False)
            failure.result = _result(run)
            raise
        finally:
            if flow is not None:
                run.collect_unread(queued=False)
                flow.result = _result(run)
        # Reached only when the block ended normally (an error in it propagates above).
        if flow is not None and flow._sends_started != flow._sends_created:
            n = flow._sends_created - flow._sends_started
            were, items = ("s were", "their items") if n != 1 else (" was", "its item")
            msg = (
                f"pipeline {run.pipeline!r}: {n} flow.send(...) call{were} never awaited, "
                f"so {items} never entered the pipeline: write `await flow.send(item)`"
            )
            raise RuntimeError(msg)
