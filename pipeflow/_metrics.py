"""Prometheus metrics: a collector that reads pipeflow's statistics at scrape time.

Workers only update plain counters (``StageCounters``); nothing here runs per item. On a
scrape, the collector adds up each stage's counters over the pipeline's finished runs
and the runs in progress, so counters only go up and gauges show the live state:

========================================  =========  ===========================
metric                                    type       the Go guide's name
========================================  =========  ===========================
``pipeflow_stage_inflight``               gauge      pool.inflight
``pipeflow_stage_queue_depth``            gauge      pool.queue_depth
``pipeflow_stage_oldest_inflight_seconds`` gauge     (age of the oldest item in a worker)
``pipeflow_stage_stalled_workers``        gauge      (workers on an item past stall_after)
``pipeflow_stage_stall_after_seconds``    gauge      (the stage's stall_after now)
``pipeflow_stage_workers``                gauge      (pool size)
``pipeflow_stage_workers_busy``           gauge      pool.workers_active
``pipeflow_stage_items_total{outcome}``   counter    pool.jobs_total, jobs_failed_total
``pipeflow_stage_duration_seconds``       histogram  pool.duration_seconds
``pipeflow_stage_queue_wait_seconds``     histogram  pool.queue_wait_seconds
``pipeflow_stage_blocked_seconds_total``  counter    (time blocked sending downstream)
``pipeflow_stage_throttled_seconds_total`` counter   (waits for a rate token or a breaker)
``pipeflow_stage_breaker_state``          gauge      (0 closed, 1 half-open, 2 open)
========================================  =========  ===========================

Every sample is labelled ``pipeline`` and ``stage``. Sources that ack (Redis Streams)
add ``pipeflow_source_acked_total``, ``pipeflow_source_reclaimed_total``,
``pipeflow_source_reconnects_total`` (counters) and ``pipeflow_source_pending`` (gauge),
labelled ``pipeline`` and ``source``, read from the source's ``statistics()``.
``metrics_port=`` serves the pipeline's registry over HTTP on 127.0.0.1 (or
``metrics_host=``) for exactly the run's lifetime.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._log import get_logger
from ._report import ReportError, describe_pipeline
from ._report.dashboard import Dashboard, render_dashboard
from ._report.scrape import scrape_families
from ._sources import SourceTotals
from ._stats import BOUNDS, StageSample

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._stage import Stage

__all__ = ["BUCKETS", "HOST", "close_listeners", "metrics_service", "register"]

#: Histogram buckets (upper bounds, seconds) of the duration and queue-wait histograms:
#: per-item latencies from 1 ms to 10 s. Each is one of the statistics' own bucket
#: bounds, so the exported counts are exact, not re-binned.
BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Index of each exported bound in the statistics' histogram (counts[i] is the bucket
# whose upper bound is BOUNDS[i]).
_BUCKET_INDEX = tuple(BOUNDS.index(b) for b in BUCKETS)

#: Seconds between two samples of the live dashboard at ``/``.
DASHBOARD_INTERVAL = 1.0

#: The metrics endpoint listens on loopback only: exposing it is the user's decision.
HOST = "127.0.0.1"

_OUTCOMES = ("ok", "failed", "retried", "dropped", "filtered", "cancelled")
_BREAKER_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_LABELS = ["pipeline", "stage"]


class _Stage:
    """One stage's counters summed over finished and live runs, as exported."""

    __slots__ = (
        "blocked",
        "breaker",
        "busy",
        "depth",
        "duration_sum",
        "durations",
        "inflight",
        "items",
        "oldest",
        "stall_after",
        "stalled",
        "throttled",
        "wait_sum",
        "waits",
        "workers",
    )

    def __init__(self, s: StageSample) -> None:
        self.items = [s.ok, s.failed, s.retried, s.dropped, s.filtered, s.cancelled]
        self.blocked = s.blocked_seconds
        self.throttled = s.throttled_seconds
        self.durations = list(s.duration_counts)
        self.duration_sum = s.duration_sum
        self.waits = list(s.wait_counts)
        self.wait_sum = s.wait_sum
        self.inflight = s.inflight
        self.depth = s.queue_depth
        self.workers = s.workers
        self.busy = s.busy_workers
        self.breaker = _BREAKER_VALUES.get(s.breaker_state or "closed", 0.0)
        self.oldest = s.oldest_inflight_seconds
        self.stalled = s.stalled_workers
        self.stall_after = s.stall_after_seconds  # only while a run is live

    def counters(self) -> _Counters:
        """The values that must only go up: item counts, blocked time, histograms."""
        return _Counters(
            items=tuple(self.items),
            blocked=self.blocked,
            throttled=self.throttled,
            durations=_cumulative(self.durations),
            duration_sum=self.duration_sum,
            waits=_cumulative(self.waits),
            wait_sum=self.wait_sum,
        )


@attrs.frozen(kw_only=True)
class _Counters:
    items: tuple[int, ...]
    blocked: float
    throttled: float
    durations: tuple[int, ...]  # cumulative at BUCKETS, then +Inf
    duration_sum: float
    waits: tuple[int, ...]
    wait_sum: float

    def at_least(self, last: _Counters | None) -> _Counters:
        """Each value no lower than in ``last``: what a counter must look like."""
        if last is None:
            return self

        def up(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(max(x, y) for x, y in zip(a, b, strict=True))

        return _Counters(
            items=up(self.items, last.items),
            blocked=max(self.blocked, last.blocked),
            throttled=max(self.throttled, last.throttled),
            durations=up(self.durations, last.durations),
            duration_sum=max(self.duration_sum, last.duration_sum),
            waits=up(self.waits, last.waits),
            wait_sum=max(self.wait_sum, last.wait_sum),
        )


def _cumulative(counts: list[int]) -> tuple[int, ...]:
    """Cumulative counts at each of BUCKETS, then at +Inf (the total)."""
    out: list[int] = []
    running = 0
    start = 0
    for idx in _BUCKET_INDEX:
        running += sum(counts[start : idx + 1])
        start = idx + 1
        out.append(running)
    out.append(running + sum(counts[start:]))
    return tuple(out)


_BUCKET_LABELS = (*(repr(b) for b in BUCKETS), "+Inf")


class _Families:
    """One scrape's metric families, each to be filled with every pipeline's samples."""

    def __init__(self) -> None:
        self.inflight = GaugeMetricFamily(
            "pipeflow_stage_inflight",
            "Items held by a stage's workers now, processing or handing over (pool.inflight).",
            labels=_LABELS,
        )
        self.queue_depth = GaugeMetricFamily(
            "pipeflow_stage_queue_depth",
            "Items waiting in a stage's input channel (pool.queue_depth).",
            labels=_LABELS,
        )
        self.workers = GaugeMetricFamily(
            "pipeflow_stage_workers",
            "Workers a stage has now (the pool size).",
            labels=_LABELS,
        )
        self.workers_busy = GaugeMetricFamily(
            "pipeflow_stage_workers_busy",
            "Workers of a stage busy with an item now (pool.workers_active).",
            labels=_LABELS,
        )
        self.items = CounterMetricFamily(
            "pipeflow_stage_items_total",
            "Items a stage finished, by outcome: ok, failed, filtered (no output), "
            "dropped (refused at the entry), cancelled (taken from a worker or a queue "
            "by a stop); retried counts retry attempts.",
            labels=[*_LABELS, "outcome"],
        )
        self.duration = HistogramMetricFamily(
            "pipeflow_stage_duration_seconds",
            "Seconds a stage took per call: one item, or one batch for a batch stage (its "
            "items are counted in pipeflow_stage_items_total); retries included, waits for "
            "a rate-limit token or a held breaker excluded (pool.duration_seconds).",
            labels=_LABELS,
        )
        self.queue_wait = HistogramMetricFamily(
            "pipeflow_stage_queue_wait_seconds",
            "Seconds an item waited before a worker of the stage took it "
            "(pool.queue_wait_seconds).",
            labels=_LABELS,
        )
        self.blocked = CounterMetricFamily(
            "pipeflow_stage_blocked_seconds_total",
            "Seconds a stage's workers spent waiting to hand outputs downstream "
            "(backpressure from a slower stage after it).",
            labels=_LABELS,
        )
        self.throttled = CounterMetricFamily(
            "pipeflow_stage_throttled_seconds_total",
            "Seconds a stage's workers spent waiting for a rate-limit token or a held "
            "circuit breaker (not counted as busy time).",
            labels=_LABELS,
        )
        self.stalled = GaugeMetricFamily(
            "pipeflow_stage_stalled_workers",
            "Workers of a stage on an item for longer than its stall_after (waits for a "
            "rate token or a held breaker not counted): stalled items, now.",
            labels=_LABELS,
        )
        self.stall_after = GaugeMetricFamily(
            "pipeflow_stage_stall_after_seconds",
            "Seconds after which an item in one of a stage's workers counts as stalled: "
            "its stall_after= option, or the default derived from its latency (while a "
            "run is live).",
            labels=_LABELS,
        )
        self.oldest_inflight = GaugeMetricFamily(
            "pipeflow_stage_oldest_inflight_seconds",
            "Seconds the oldest item now in one of a stage's workers has been there "
            "(0 when none is): a stall shows as a number that keeps growing.",
            labels=_LABELS,
        )
        self.breaker = GaugeMetricFamily(
            "pipeflow_stage_breaker_state",
            "State of a stage's circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=_LABELS,
        )

    def __iter__(self) -> Iterator[Metric]:
        return iter(
            (
                self.inflight,
                self.queue_depth,
                self.workers,
                self.workers_busy,
                self.items,
                self.duration,
                self.queue_wait,
                self.blocked,
                self.throttled,
                self.oldest_inflight,
                self.stalled,
                self.stall_after,
                self.breaker,
            )
        )

    def filled(self) -> list[Metric]:
        """The families to expose: the breaker gauge only if some stage has a breaker,
        stall_after only while a run is live."""
        return [f for f in self if f.samples or f not in (self.breaker, self.stall_after)]

    def add(self, labels: list[str], st: _Stage, c: _Counters, breaker: bool) -> None:
        self.inflight.add_metric(labels, st.inflight)
        self.queue_depth.add_metric(labels, st.depth)
        self.workers.add_metric(labels, st.workers)
        self.workers_busy.add_metric(labels, st.busy)
        self.oldest_inflight.add_metric(labels, st.oldest)
        self.stalled.add_metric(labels, st.stalled)
        if st.stall_after is not None:
            self.stall_after.add_metric(labels, st.stall_after)
        for outcome, n in zip(_OUTCOMES, c.items, strict=True):
            self.items.add_metric([*labels, outcome], n)
        self.duration.add_metric(
            labels, list(zip(_BUCKET_LABELS, c.durations, strict=True)), c.duration_sum
        )
        self.queue_wait.add_metric(
            labels, list(zip(_BUCKET_LABELS, c.waits, strict=True)), c.wait_sum
        )
        self.blocked.add_metric(labels, c.blocked)
        self.throttled.add_metric(labels, c.throttled)
        if breaker:
            self.breaker.add_metric(labels, st.breaker)


class PipelineCollector(Collector):
    """The pipeflow metrics of every pipeline registered in one registry.

    One collector per registry, so each metric family appears once in the exposition,
    with a ``pipeline`` label telling pipelines apart. It reads counters at scrape
    time; nothing here runs per item.
    """

    def __init__(self) -> None:
        self._pipelines: dict[str, Pipeline[Any, Any]] = {}
        # Last counters exported per (pipeline, stage), so counters never go backwards,
        # even for a scrape from another thread (prometheus_client.start_http_server)
        # that lands between a run leaving the live list and joining the totals.
        self._last: dict[tuple[str, str], _Counters] = {}
        self._lock = threading.Lock()

    def add(self, pipeline: Pipeline[Any, Any]) -> None:
        name = pipeline.name
        with self._lock:
            if name in self._pipelines:
                msg = (
                    f"a pipeline named {name!r} is already registered in this "
                    f"CollectorRegistry; its metrics are labelled pipeline={name!r}, so "
                    f"give each pipeline its own name (Pipeline(..., name=...)) or its "
                    f"own registry"
                )
                raise ValueError(msg)
            self._pipelines[name] = pipeline

    def describe(self) -> Iterable[Metric]:
        # Names only: the registry then refuses another collector with the same names.
        return list(_Families())

    def collect(self) -> Iterable[Metric]:
        families = _Families()
        sources = _SourceFamilies()
        with self._lock:
            for pipeline in list(self._pipelines.values()):
                for stage, st in _read(pipeline):
                    key = (pipeline.name, stage.name)
                    c = self._last[key] = st.counters().at_least(self._last.get(key))
                    has_breaker = stage.options.breaker is not None
                    families.add([pipeline.name, stage.name], st, c, has_breaker)
                for name, totals in pipeline._sources.totals().items():
                    sources.add([pipeline.name, name], totals)
        return [*families.filled(), *sources.filled()]


class _SourceFamilies:
    """The metrics of acking sources (Redis Streams), from their ``statistics()``."""

    def __init__(self) -> None:
        labels = ["pipeline", "source"]
        self.acked = CounterMetricFamily(
            "pipeflow_source_acked_total",
            "Entries a source acknowledged: their items left the pipeline.",
            labels=labels,
        )
        self.reclaimed = CounterMetricFamily(
            "pipeflow_source_reclaimed_total",
            "Entries a source took over from consumers that left them idle (dead ones).",
            labels=labels,
        )
        self.reconnects = CounterMetricFamily(
            "pipeflow_source_reconnects_total",
            "Times a source's server came back after being unreachable.",
            labels=labels,
        )
        self.pending = GaugeMetricFamily(
            "pipeflow_source_pending",
            "Entries a source read and has not acknowledged yet (in the pipeline now).",
            labels=labels,
        )

    def add(self, labels: list[str], totals: SourceTotals) -> None:
        self.acked.add_metric(labels, totals.acked)
        self.reclaimed.add_metric(labels, totals.reclaimed)
        self.reconnects.add_metric(labels, totals.reconnects)
        self.pending.add_metric(labels, totals.pending)

    def filled(self) -> list[Metric]:
        """Only where some pipeline read an acking source."""
        families = [self.acked, self.reclaimed, self.reconnects, self.pending]
        return families if self.acked.samples else []


def _read(pipeline: Pipeline[Any, Any]) -> Iterator[tuple[Stage[Any, Any], _Stage]]:
    """Each stage's figures (finished runs plus the runs in progress), as exported."""
    samples = pipeline.samples()
    for stage in pipeline.stages:
        yield stage, _Stage(samples[stage.name])


# One collector per registry (held weakly: the registry owns it).
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PipelineCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(pipeline: Pipeline[Any, Any], registry: CollectorRegistry) -> None:
    """Publish ``pipeline``'s metrics in ``registry`` (``Pipeline(..., registry=...)``).

    Pipelines sharing a registry are told apart by their ``pipeline`` label; a second
    pipeline with the same name in the same registry raises ``ValueError``.
    """
    if not isinstance(registry, CollectorRegistry):
        msg = (
            f"pipeline {pipeline.name!r}: registry= must be a "
            f"prometheus_client.CollectorRegistry, got {registry!r} ({type(registry).__name__})"
        )
        raise TypeError(msg)
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = PipelineCollector()
            collector.add(pipeline)
            registry.register(collector)
            _collectors[registry] = collector
            return
    collector.add(pipeline)


# -- the HTTP endpoint ---------------------------------------------------------------------

#: A client gets this long to send its request; a stuck one must not pile up.
_REQUEST_TIMEOUT = 10.0
_MAX_HEAD = 16 * 1024


def metrics_service(
    pipeline: Pipeline[Any, Any],
    port: int,
    *,
    host: str = HOST,
    source: object = None,
    listeners: list[trio.SocketListener] | None = None,
    handoff: list[trio.SocketListener] | None = None,
) -> Callable[..., Awaitable[None]]:
    """The ``metrics_port=`` service: ``/metrics`` over HTTP on ``host``:``port``
    (127.0.0.1 unless ``metrics_host=`` says otherwise), the live dashboard at ``/``
    (figures at ``/dashboard.json``), and what each worker is doing at ``/workers``.

    Returns an async function for ``nursery.start``: it listens, sets
    ``pipeline.metrics_address`` to the bound ``(host, port)`` (useful with port 0,
    which picks a free port), reports started, and serves until cancelled, then closes
    its socket. A pipeline without a registry gets a private one
    (``pipeline.registry``). ``source``: what the run reads, for the buffers the
    dashboard shows (an acking source's first stage gets a larger one).

    ``listeners``: sockets already listening (handed on by a run's endpoint, see
    ``handoff``) to serve on instead of opening new ones. ``handoff``: a list the
    service puts its listening sockets in when it ends, instead of closing them, for a
    linger to serve on (``metrics_linger=``): the port never stops listening between
    the run and its linger, so a scrape then waits in the backlog instead of being
    refused. Whoever passes ``handoff`` closes what it gets (:func:`close_listeners`).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        msg = (
            f"pipeline {pipeline.name!r}: metrics_port= must be an int from 0 to 65535 "
            f"(0 picks a free port), got {port!r}"
        )
        raise (TypeError if isinstance(port, bool) or not isinstance(port, int) else ValueError)(
            msg
        )
    if not isinstance(host, str) or not host:
        msg = (
            f"pipeline {pipeline.name!r}: metrics_host= must be an address to listen on, "
            f"such as '127.0.0.1' or '0.0.0.0', got {host!r}"
        )
        raise TypeError(msg)
    registry = pipeline.registry
    if registry is None:
        registry = CollectorRegistry()
        register(pipeline, registry)
        pipeline.registry = registry
    dashboard = Dashboard(structures={pipeline.name: describe_pipeline(pipeline, source=source)})

    async def serve_metrics(
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if listeners is not None:
            sockets = listeners[:]
            listeners.clear()  # this service owns them now
        else:
            try:
                sockets = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                msg = (
                    f"pipeline {pipeline.name!r}: cannot serve metrics on {host}:{port}: "
                    f"{exc.strerror or exc}"
                )
                raise OSError(exc.errno, msg) from exc
        bound_host, bound = sockets[0].socket.getsockname()[:2]
        address = (str(bound_host), int(bound))
        # Pipeline does not declare the attribute (yet): set it through Any.
        owner: Any = pipeline
        owner.metrics_address = address
        try:
            task_status.started(address)

            def workers() -> dict[str, list[dict[str, Any]]]:
                statuses = pipeline.current_workers() or []
                return {pipeline.name: [w.to_dict() for w in statuses]}

            async def handler(stream: trio.SocketStream) -> None:
                await _handle(stream, registry, dashboard, workers)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sample_dashboard, registry, dashboard)
                for listener in sockets:
                    # Not trio.serve_listeners: it closes its listeners as it ends.
                    nursery.start_soon(_accept, listener, handler, pipeline.name)
        finally:
            if getattr(owner, "metrics_address", None) == address:
                owner.metrics_address = None
            if handoff is not None:
                handoff.extend(sockets)
            else:
                close_listeners(sockets)

    return serve_metrics


def check_metrics_linger(pipeline: Pipeline[Any, Any], seconds: object, port: object) -> float:
    """``metrics_linger=`` as seconds (a number >= 0), or an error naming the option and
    the value; a linger needs an endpoint (``metrics_port=``)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        msg = (
            f"pipeline {pipeline.name!r}: metrics_linger= must be a number of seconds >= 0, "
            f"got {seconds!r}"
        )
        raise TypeError(msg)
    if not (seconds >= 0 and math.isfinite(seconds)):
        msg = (
            f"pipeline {pipeline.name!r}: metrics_linger= must be a finite number of "
            f"seconds >= 0, got {seconds!r}"
        )
        raise ValueError(msg)
    if seconds and port is None:
        msg = (
            f"pipeline {pipeline.name!r}: metrics_linger={seconds!r} needs metrics_port=: "
            f"there is no endpoint to keep serving"
        )
        raise ValueError(msg)
    return float(seconds)


async def linger_metrics(
    pipeline: Pipeline[Any, Any],
    host: str,
    port: int,
    seconds: float,
    *,
    signals: bool,
    listening: Callable[[], None] | None = None,
    listeners: list[trio.SocketListener] | None = None,
) -> OSError | None:
    """Serve ``pipeline``'s metrics on ``host``:``port`` for ``seconds`` more, after its
    run has ended (``metrics_linger=``, ``--metrics-linger``): its final figures stay up
    long enough for Prometheus's next scrape, rather than the target going down with
    a batch job. With ``signals`` (main thread only), SIGINT or SIGTERM ends it at once;
    so does a cancellation. If the port was taken meanwhile, logs
    ``metrics_linger_failed`` and returns the error (the run's result stands).
    ``listening`` is called once the endpoint listens again (the CLI says so then).
    ``listeners``: the run's listening sockets (its ``handoff``), served on as they are
    (so that the port never stops listening) and closed at the end; without them, the
    port is opened anew."""
    serve = metrics_service(pipeline, port, host=host, listeners=listeners or None)
    with contextlib.ExitStack() as stack:
        received = (
            stack.enter_context(trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
            if signals
            else None
        )
        taken: OSError | None = None
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + seconds
            try:
                await nursery.start(serve)
            except OSError as exc:
                taken = exc  # raised below, not wrapped in the nursery's group
            if listening is not None and taken is None:
                listening()
            if received is not None and taken is None:

                async def stop_on_signal() -> None:
                    async for _ in received:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
    if taken is not None:
        get_logger(pipeline=pipeline.name).warning("metrics_linger_failed", error=str(taken))
    return taken


#: What ``accept()`` raises when the process or the system runs out of something a new
#: connection needs: wait for connections to close, do not stop serving.
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
    if hasattr(errno, name)
)


async def _accept(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    pipeline: str,
) -> None:
    """Accept connections on ``listener``, each answered by ``handler`` in a task of its
    own, until cancelled; the listener stays open (its owner closes it, or hands it on).
    A request under way when this is cancelled is cut, as with trio.serve_listeners."""
    short = False  # accept() is failing for want of file descriptors (or memory)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                if not short:
                    # Said once for each spell, not every 0.1 s; the run goes on.
                    get_logger(pipeline=pipeline).warning(
                        "metrics_accept_failed",
                        error=exc.strerror or str(exc),
                        retry_every=0.1,
                    )
                    short = True
                # As trio.serve_listeners does: wait a little for some to be freed.
                await trio.sleep(0.1)
            else:
                short = False
                nursery.start_soon(handler, stream)


def close_listeners(listeners: Iterable[trio.SocketListener]) -> None:
    """Close listening sockets now, in Trio or outside it (the CLI closes the ones a
    linger did not take after its run's ``trio.run`` has returned), without a checkpoint:
    safe in a ``finally`` of a cancelled task."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        in_trio = False  # no run: nothing can be waiting on them
    else:
        in_trio = True
    for listener in listeners:
        sock = listener.socket
        if in_trio:
            sock.close()  # tells the run's tasks waiting on it (notify_closing)
        elif sock.fileno() != -1:
            os.close(sock.detach())


async def _sample_dashboard(registry: CollectorRegistry, dashboard: Dashboard) -> None:
    """Once a second, the registry's pipeflow figures into the dashboard's history: read
    from the collectors directly (no text written or parsed), only while an endpoint is
    served."""
    while True:
        try:
            scrape = scrape_families(registry.collect())
        except ReportError:
            scrape = None  # nothing of pipeflow's in it yet
        if scrape is not None:
            dashboard.sample(trio.current_time(), scrape)
        await trio.sleep(DASHBOARD_INTERVAL)


async def _handle(
    stream: trio.SocketStream,
    registry: CollectorRegistry,
    dashboard: Dashboard | None = None,
    workers: Callable[[], dict[str, list[dict[str, Any]]]] | None = None,
) -> None:
    """Answer one request on one connection, then close it (``Connection: close``)."""
    async with stream:
        try:
            with trio.move_on_after(_REQUEST_TIMEOUT):
                head = await _read_head(stream)
                if head is None:
                    return
                await stream.send_all(_respond(head, registry, dashboard, workers))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # The client went away; the pipeline must not care.
            return


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > _MAX_HEAD:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    return bytes(buf)


def _respond(
    head: bytes,
    registry: CollectorRegistry,
    dashboard: Dashboard | None = None,
    workers: Callable[[], dict[str, list[dict[str, Any]]]] | None = None,
) -> bytes:
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3:
        return _response("400 Bad Request", b"bad request\n")
    method, target, _version = parts
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET /metrics\n", extra=["Allow: GET, HEAD"])
    path = target.split("?", 1)[0]
    head_only = method == "HEAD"
    now = workers() if workers is not None else None
    if dashboard is not None and path in ("/", "/index.html"):
        page = render_dashboard(dashboard.snapshot(now)).encode("utf-8")
        return _response(
            "200 OK", page, content_type="text/html; charset=utf-8", head_only=head_only
        )
    if dashboard is not None and path == "/dashboard.json":
        body = json.dumps(dashboard.snapshot(now), ensure_ascii=False).encode("utf-8")
        return _response("200 OK", body, content_type="application/json", head_only=head_only)
    if now is not None and path == "/workers":
        ((name, rows),) = now.items()
        body = json.dumps({"pipeline": name, "workers": rows}, ensure_ascii=False).encode("utf-8")
        return _response("200 OK", body, content_type="application/json", head_only=head_only)
    if path != "/metrics":
        return _response(
            "404 Not Found",
            b"pipeflow serves its metrics at /metrics, a dashboard at / and its workers "
            b"at /workers\n",
        )
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    try:
        body = encoder(registry)
    except Exception as exc:  # a broken collector must not stop the pipeline
        return _response("500 Internal Server Error", f"{exc!r}\n".encode())
    return _response("200 OK", body, content_type=content_type, head_only=method == "HEAD")


def _response(
    status: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: list[str] | None = None,
    head_only: bool = False,
) -> bytes:
    headers = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(extra or []),
    ]
    return "\r\n".join(headers).encode("latin-1") + b"\r\n\r\n" + (b"" if head_only else body)
