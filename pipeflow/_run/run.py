"""One execution of a pipeline: the nursery, the source pump, signals, the outcome.

Shape of a run (the trio docs' ``channels-mpmc-fixed`` pattern, once per stage)::

    source ──edge──▶ stage 0 workers ──edge──▶ stage 1 workers ──▶ … ──▶ outlet

Every worker registers on its input and output edge and leaves them when done, so when
the source ends the close cascades stage by stage. Everything runs in one nursery, so
one cancel scope stops every worker at once, and no task outlives the run. Dead-letter
stages run in a nursery around it, so that the items a fail-fast stop hands them still
reach them; services (a metrics endpoint) in one around that.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from itertools import islice, repeat, starmap
from typing import Any, ClassVar, Literal, cast

import trio

from .._errors import StageError
from .._log import get_logger
from .._policies import BreakerRuntime, BreakerState, CircuitBreaker
from .._sources import is_acking
from .._stage import Stage
from .._stats import StageStats
from .edge import CHUNK, Edge
from .envelope import Ack, Env, KeyedAckEnv, KeyedSource, KeyFailed
from .failures import TEARDOWN_LIMIT, finish_budget
from .forensics import watch_stalls
from .shapers import batcher, order_once, router, supervise
from .worker import CollectSink, DropSink, Outbox, StageRun, teardown_scope

#: An async source that took longer than this to give its next item made the source's
#: task wait for it (a sleep, I/O: at least one scheduler round); one that has its items
#: at hand gives each in a few microseconds.
SOURCE_WAITED = 20e-6

Outlet = Literal["collect", "drop", "channel"]

#: A service runs beside a pipeline for exactly its lifetime (a metrics endpoint):
#: started with ``nursery.start`` before the first item, cancelled after the last.
Service = Callable[..., Awaitable[None]]


@contextlib.asynccontextmanager
async def running(run: Run, services: Sequence[Service] = ()) -> AsyncIterator[trio.Nursery]:
    """Start ``run`` in a nursery of its own; on exit, wait for it and raise its failure.

    The body runs inside the run's cancel scope: a fail-fast error cancels it too.
    Three nested lifetimes: services (a metrics endpoint) outlive the dead-letter
    stages, which outlive the main stages, so failed items still reach their sink when
    a fail-fast error stops the main stages.
    """
    failure: BaseException | None = None
    try:
        async with _services(services) as service_nursery:
            async with _stages(run, service_nursery) as nursery:
                yield nursery
            # Every stage has drained: end-of-stream checks (fractional error budgets).
            for sr in run.stages:
                finish_budget(sr)
    except BaseExceptionGroup as group:
        failure = run.primary_error(group)
        if failure is None:
            raise
    finally:
        if run.started:
            _finished(run)
    if failure is not None:
        raise failure


@contextlib.asynccontextmanager
async def _services(services: Sequence[Service]) -> AsyncIterator[trio.Nursery]:
    """A nursery with the services started in it, cancelled when the body is done."""
    async with trio.open_nursery() as service_nursery:
        for service in services:
            await service_nursery.start(service)
        try:
            yield service_nursery
        finally:
            service_nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _stages(run: Run, service_nursery: trio.Nursery) -> AsyncIterator[trio.Nursery]:
    """The dead-letter stages' nursery around the main stages' nursery (yielded).

    A stop of the main stages is held until the dead-letter stages have taken what they
    were given (raised at once, it would cancel them), then raised.
    """
    stopped: BaseException | None = None
    try:
        with run.dead_letter_scope:
            async with trio.open_nursery() as dead_letter_nursery:
                run.dead_letter_nursery = dead_letter_nursery
                run.start_dead_letters(dead_letter_nursery)
                try:
                    async with trio.open_nursery() as nursery:
                        run.cancel_scope = nursery.cancel_scope
                        # A signal's grace may have started before this scope existed;
                        # the dead-letter scope has it already.
                        nursery.cancel_scope.deadline = run.dead_letter_scope.deadline
                        run.start(nursery)
                        # One stall watcher per run, gone with the services.
                        service_nursery.start_soon(
                            watch_stalls, run, name=f"pipeflow:{run.pipeline}:stalls"
                        )
                        try:
                            yield nursery
                        except BaseException as exc:
                            run.body_error = exc
                            raise
                except BaseException as exc:
                    stopped = exc
                finally:
                    run.close_dead_letters()
    except BaseException as late:
        if stopped is None or run.first_failure is None:
            raise
        # The run had failed (``stopped``) when this came: the caller's cancellation,
        # while the dead-letter stages wound down. Both go up, as from one nursery, so
        # that the failure is not lost.
        raise BaseExceptionGroup("pipeflow run", [stopped, late]) from None
    if stopped is not None:
        raise stopped


def _finished(run: Run) -> None:
    """The run is over, however it ended: settle the source, stop the clock, log it."""
    run.settle()
    run.t_end = run.now()
    counts = {
        sr.name: {
            "items_in": sr.c.items_in,
            "items_out": sr.c.items_out,
            "failed": sr.c.failed,
            "cancelled": sr.c.cancelled,
        }
        for sr in run.stages
    }
    run.log.info(
        "run_finished",
        elapsed=run.t_end - run.t_start,
        failed=run.first_failure is not None,
        counts=counts,
    )


class RunFailed(Exception):
    """Raised into an acking source's context when the run failed or a stop cut its
    input: not every item it gave will be acked (see Run.pump)."""


class Run:
    """One execution of a pipeline: its stages, edges, outputs and failures."""

    def __init__(
        self,
        stages: Sequence[Stage[Any, Any]],
        *,
        pipeline: str,
        outlet: Outlet,
        dead_letter: Any = None,
        outlet_buffer: int = 0,
        max_failures: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.max_failures = max_failures
        self.failures = 0  # items failed under collect / skip, for the pipeline's budget
        self.outlet: Outlet = outlet
        self.dead_letter = dead_letter
        self.log = get_logger(pipeline=pipeline)
        self.now: Callable[[], float] = trio.current_time
        self.outputs: list[Any] = []
        self.errors: list[StageError] = []
        #: ``(stage, item)`` for every item a stop took from a worker or a queue.
        self.unfinished: list[tuple[str, Any]] = []
        # Outputs made that the reader of stream() never took (see collect_unread).
        self.unread: list[Any] = []
        self._unread_collected = False
        self.first_failure: BaseException | None = None
        #: What the caller's code in the ``async with`` block raised, if anything.
        self.body_error: BaseException | None = None
        #: Set once the reader of ``stream()`` has taken the last output.
        self.outlet_drained = trio.Event()
        self.t_start = 0.0
        self.t_end: float | None = None
        self._breakers: dict[int, BreakerRuntime] = {}
        self.dead_letter_runs: list[StageRun] = []
        self.dead_letter_scope = trio.CancelScope()
        self.handovers: set[trio.CancelScope] = set()  # items on their way to dead letters
        self.dead_letter_nursery: trio.Nursery | None = None
        self._dead_letters_closed = False
        self.started = False
        self.stages = [StageRun(self, s, i) for i, s in enumerate(stages)]
        order_once(self.stages)
        self.outlet_edge: Edge | None = None
        out: Outbox
        if outlet == "channel":
            self.outlet_edge = out = Edge(outlet_buffer)
        elif outlet == "collect":
            out = CollectSink(self.outputs)
        else:
            out = DropSink()
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            a.connect(b.inbox)
            if b.takes_lone_items() and not b.opts.autoscale and not b.opts.ordered:
                a.runs_on_to = b  # see runon.py
        self.stages[-1].connect(out)
        # The edges behind shapers (a batcher's, a key router's), for the accounting.
        self._inner_edges: dict[int, list[Edge]] = {}
        # Graceful stop: the source stops (pump_scope), in-flight items finish, and the
        # stages' cancel scope gets a deadline (the grace period).
        self.pump_scope = trio.CancelScope()
        self.cancel_scope: trio.CancelScope | None = None
        self.interrupted_by: int | None = None

    def breaker_for(self, config: CircuitBreaker, stage: str) -> BreakerRuntime:
        key = id(config)
        if key not in self._breakers:

            def on_change(old: BreakerState, new: BreakerState) -> None:
                self.log.warning("breaker_state_changed", stage=stage, old=old, new=new)

            self._breakers[key] = BreakerRuntime(config, on_change)
        return self._breakers[key]

    # -- dead letters ------------------------------------------------------------------------

    def dead_letter_run(self, stage: Stage[Any, Any]) -> StageRun:
        """The side stage for a dead-letter :class:`Stage` (one per stage object)."""
        for dl in self.dead_letter_runs:
            if dl.stage is stage:
                return dl
        dl = StageRun(self, stage, -1)
        dl.connect(DropSink())
        # The main stages send to it together: one registration, left when they are gone.
        dl.inbox.add_sender()
        self.dead_letter_runs.append(dl)
        return dl

    def start_dead_letters(self, nursery: trio.Nursery) -> None:
        for dl in self.dead_letter_runs:
            self.launch(dl, nursery)

    def close_dead_letters(self) -> None:
        if not self._dead_letters_closed:
            self._dead_letters_closed = True
            for dl in self.dead_letter_runs:
                dl.inbox.sender_done()

    async def wait_drained(self) -> None:
        """Until every item has left the pipeline (main stages, then dead letters)."""
        await self.stages[-1].workers_gone.wait()
        if self.outlet_edge is not None:
            await self.outlet_drained.wait()  # outputs are acked as the reader takes them
        for dl in self.dead_letter_runs:
            await dl.workers_gone.wait()

    # -- stopping ----------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        if self.first_failure is None:
            self.first_failure = error
            self.pump_scope.cancel()  # take no more input
            # Hand-overs to dead-letter stages may finish, but not for ever.
            deadline = trio.current_time() + TEARDOWN_LIMIT
            for scope in self.handovers:
                scope.deadline = min(scope.deadline, deadline)

    def stop_input(self, grace: float | None) -> None:
        """Stop taking input; the items already in finish, for at most ``grace`` seconds.

        The source's task leaves the first edge as it goes (starting the cascade);
        leaving it here instead would race with a hand-over it is about to make.
        """
        self.pump_scope.cancel()
        if grace is not None:
            deadline = trio.current_time() + grace
            for scope in (self.cancel_scope, self.dead_letter_scope):
                if scope is not None:
                    scope.deadline = min(scope.deadline, deadline)

    def cancel(self) -> None:
        """Cancel every worker now."""
        self.pump_scope.cancel()
        self.dead_letter_scope.cancel()
        for scope in self.handovers:
            scope.cancel()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # -- wiring ------------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Start every stage's tasks; the first stage's ``inbox`` takes the input."""
        clock = trio.lowlevel.current_clock()
        self.now = clock.current_time
        for sr in (*self.stages, *self.dead_letter_runs):
            sr.inbox.now = self.now
        if self.outlet_edge is not None:
            self.outlet_edge.now = self.now
            self.outlet_edge.add_receiver()  # the reader (Outputs)
        self.t_start = self.now()
        self.started = True
        self.log.info("run_started", stages=[s.name for s in self.stages])
        for sr in self.stages:
            self.launch(sr, nursery)

    def launch(self, sr: StageRun, nursery: trio.Nursery) -> None:
        """Start a stage's tasks: its process pool if any, its shapers, its workers."""
        if sr.process_pool is None:
            self._launch(sr, nursery)
            return
        # Hold both edges open until the pool is up and the workers hold them.
        sr.inbox.add_receiver()
        sr.add_sender()
        nursery.start_soon(
            self._launch_with_processes,
            sr,
            nursery,
            name=f"pipeflow:{self.pipeline}:{sr.name}:processes",
        )

    async def _launch_with_processes(self, sr: StageRun, nursery: trio.Nursery) -> None:
        """Process stages: the worker processes live exactly as long as the workers."""
        held = True
        try:
            async with sr.process_pool.open():
                self._launch(sr, nursery)
                sr.inbox.receiver_done()
                sr.sender_done()
                held = False
                try:
                    await sr.workers_gone.wait()
                finally:
                    # Cancelled: the pool closes only once every worker has left, so a
                    # worker still finishing an item never finds it gone.
                    with teardown_scope():
                        await sr.workers_gone.wait()
        except Exception as exc:
            if held:
                # The pool could not start: the run stops on it, as on a resource that
                # cannot open (see StageRun._resource).
                self.fail(exc)
            raise
        finally:
            if held:
                sr.inbox.receiver_done()
                sr.sender_done()
                if sr.c.workers == 0:
                    sr.workers_gone.set()

    def _launch(self, sr: StageRun, nursery: trio.Nursery) -> None:
        name = f"pipeflow:{self.pipeline}:{sr.name}"
        opts = sr.opts
        inbox = sr.inbox
        inner: list[Edge] = []
        if opts.batch is not None:
            batches = Edge(0, self.now, stamp=False)
            inbox.add_receiver()
            batches.add_sender()
            nursery.start_soon(batcher, sr, inbox, batches, name=f"{name}:batcher")
            inner.append(batches)
            inbox = batches
        if opts.key is not None:
            per_worker = max(1, -(-opts.buffer_size // opts.max_workers))
            edges = [Edge(per_worker, self.now, stamp=False) for _ in range(opts.max_workers)]
            inbox.add_receiver()
            for edge in edges:
                edge.add_sender()
            nursery.start_soon(router, sr, inbox, edges, name=f"{name}:router")
            for edge in edges:
                sr.start_worker(nursery, edge)
            inner.extend(edges)
        else:
            for _ in range(opts.min_workers):
                sr.start_worker(nursery, inbox)
            if opts.autoscale:
                inbox.add_keeper()
                sr.add_sender()
                nursery.start_soon(supervise, sr, nursery, inbox, name=f"{name}:autoscale")
        self._inner_edges[id(sr)] = inner

    # -- the source --------------------------------------------------------------------------

    async def pump(self, source: Iterable[Any] | Any) -> None:
        """Feed the source into the first stage, then leave it (starting the cascade)."""
        if hasattr(source, "__pipeflow_open__"):  # is_acking(source), as mypy narrows it
            # An acking source (Redis Streams): items come with an Ack each, and the
            # source never holds more un-acked items than the run can hold. It stays open
            # after its input ends (or is stopped by a signal) until every item in flight
            # has left the pipeline, so that it can ack them.
            try:
                async with source.__pipeflow_open__(capacity=self.capacity()) as entries:
                    cut = False
                    with self.pump_scope:
                        try:
                            await self._pump(entries, acking=True)
                        except trio.BrokenResourceError:
                            # The main stages stopped (a failure, raised by the run):
                            # read no more, but stay open so dead-letter stages can ack
                            # what they took.
                            cut = True
                    await self.wait_drained()
                    if self.first_failure is not None or cut or self.pump_scope.cancelled_caught:
                        # Tell the source the run failed, or a stop (a signal) cut its
                        # input: some items it gave will never be acked (one taken from
                        # it as the stop came, left in front of the first stage), so it
                        # must not wait for them (it releases them).
                        raise RunFailed
            except RunFailed:
                pass
            except Exception as exc:
                self.fail(exc)
                raise
        else:
            with self.pump_scope:
                await self._pump(source)

    def start_source(self, nursery: trio.Nursery, source: Iterable[Any] | Any) -> None:
        """Start the task that feeds ``source`` in. An acking source's task lives beside
        the dead-letter stages, not the main ones, so that a fail-fast stop does not
        close the source before the items the dead-letter stages took are acked."""
        if is_acking(source):
            first = self.stages[0]
            first.inbox.capacity = first.opts.input_buffer(after_acking_source=True)
            if self.dead_letter_nursery is not None:
                nursery = self.dead_letter_nursery
        self.stages[0].inbox.add_sender()
        nursery.start_soon(self.pump, source, name=f"pipeflow:{self.pipeline}:source")

    async def _pump(self, source: Iterable[Any] | Any, *, acking: bool = False) -> None:
        inbox = self.stages[0].inbox
        try:
            if acking:
                take_keyed = getattr(source, "_pipeflow_take_keyed", None)
                if take_keyed is not None:
                    # pipeflow's own paging sources (Redis) ack by key: each item goes
                    # in an envelope that is also its ack (one object per item, not two).
                    owner = cast(KeyedSource, source)
                    while True:
                        items, keys = await take_keyed(max(1, inbox.room()))
                        if not items:
                            return
                        await inbox.put(list(map(KeyedAckEnv, repeat(owner), items, keys)))
                take = getattr(source, "__pipeflow_take__", None)
                if take is not None:
                    # A source that reads pages (Redis) hands them over in chunks: as
                    # many as the first stage has room for in one put, not one per item.
                    while pairs := await take(max(1, inbox.room())):
                        await inbox.put(list(starmap(Env, pairs)))
                    return
                entries = cast(AsyncIterator[tuple[Any, Ack | None]], source)
                async for item, ack in entries:
                    await inbox.put([Env(item, ack)])
            elif hasattr(source, "__aiter__"):
                aiter_ = source.__aiter__()
                owns = hasattr(aiter_, "aclose") and not isinstance(source, trio.abc.ReceiveChannel)
                async with contextlib.aclosing(aiter_) if owns else contextlib.nullcontext():
                    asked = -math.inf  # when this task asked the source for the item
                    async for item in aiter_:
                        envs = [Env(item)]
                        if inbox.put_now(envs):
                            now = envs[0].t  # stamped by the hand-over
                            if inbox.woke and now - asked > SOURCE_WAITED:
                                # The source made this task wait for the item, and a
                                # worker waits for it: let the worker start before this
                                # task goes on to ask for the next (latency at low
                                # load: the next may take as long). Not when the source
                                # has its items at hand (a round per item would be the
                                # cost, and they would go one by one, not in chunks).
                                await trio.lowlevel.checkpoint()
                                now = self.now()
                        else:
                            await inbox.put(envs)  # the workers are busy: nothing to let go
                            now = self.now()
                        asked = now
            else:
                # A plain iterable is pulled only as far as the first stage has room,
                # so an endless source streams in bounded memory.
                it = iter(source)
                spins = 0
                while True:
                    room = inbox.room()
                    if room > 0:
                        chunk = [Env(x) for x in islice(it, min(room, CHUNK))]
                        if not chunk:
                            break
                        await inbox.put(chunk)  # the fast path: it fits
                        spins += len(chunk)
                        if spins >= CHUNK:
                            spins = 0
                            await trio.lowlevel.checkpoint()
                    else:
                        for x in it:
                            await inbox.put([Env(x)])
                            break
                        else:
                            break
                        spins = 0
        except Exception as exc:
            if isinstance(exc, trio.ClosedResourceError) and isinstance(
                source, trio.abc.ReceiveChannel
            ):
                # Trio says nothing more: say which object was closed, and how to end it.
                exc.add_note(
                    "the source, a Trio receive channel, was closed by the program's own "
                    "code; to end the stream, close its send side instead"
                )
            if not isinstance(exc, trio.BrokenResourceError):
                self.fail(exc)
            raise
        finally:
            inbox.sender_done()

    def capacity(self) -> int:
        """How many items this run can hold at once: in workers, buffers and windows."""
        total = 0
        batches = 1
        for sr in self.stages:
            o = sr.opts
            total += o.max_workers + sr.inbox.capacity  # (the first's: see input_buffer)
            if sr.reorder is not None:
                total += sr.reorder.size
            if o.batch is not None:
                # A batch stage holds up to a batch per worker plus the one filling;
                # batch stages in a row multiply (each batch of the second needs
                # batches of the first), so a source that keeps this many items un-acked
                # never waits for acks that cannot come.
                batches *= o.batch * (o.max_workers + 1)
        # Dead-letter stages hold failed items (and their acks) too.
        for dl in self.dead_letter_runs:
            o = dl.opts
            total += o.max_workers + o.buffer_size
            if o.batch is not None:
                total += o.batch * (o.max_workers + 1)
        return total + (batches if batches > 1 else 0)

    # -- accounting after a stop ---------------------------------------------------------------

    def unfinish(self, sr: StageRun, envs: Sequence[Env], *, counted: bool = True) -> None:
        """Items a stop took from ``sr``: ``cancelled``, and listed as unfinished.
        ``counted``: already in ``items_in`` (taken by a worker), else queued."""
        c = sr.c
        for env in envs:
            item = env.item
            if type(item) is KeyFailed:
                item = item.item
            if sr.batched and type(item) is list:
                w = len(item)
                self.unfinished.extend((sr.name, x) for x in item)
            else:
                w = 1
                self.unfinished.append((sr.name, item))
            c.cancelled += w
            if counted:
                c.inflight -= w
            else:
                c.items_in += w

    def strand(self, sr: StageRun, outs: list[Env], results: list[tuple[int, list[Env]]]) -> None:
        """Outputs ``sr`` made but could not hand on before a stop: they count as
        queued in front of the next stage (or, for the last, as unread outputs). The
        outlet of ``run()`` takes them at once, as it takes any: they were counted ok,
        and ``run()`` keeps every output (``collect=False`` acks them all the same)."""
        if results:
            # An ordered stage's, by input position: into its order window, which the
            # stop's settle() empties in order, with what it held (the outputs of other
            # workers cut at the same stop, and those waiting for an item the stop took,
            # come in between).
            assert sr.reorder is not None
            sr.reorder.keep(results)
        if isinstance(sr.out, Edge):
            sr.out.stranded.extend(outs)
        else:
            sr.out.put_now(outs)

    def settle(self) -> None:
        """After the last task: what a stop left queued counts as cancelled, so that
        ``items_in == ok + filtered + failed + dropped + cancelled`` for every stage."""
        for sr in (*self.stages, *self.dead_letter_runs):
            if sr.reorder is not None:
                # Outputs made (counted ok) and held for an earlier item the stop took:
                # queued in front of the next stage, or run()'s outputs, as strand().
                self.strand(sr, sr.reorder.leftovers(), [])
            self.unfinish(sr, sr.inbox.leftovers(), counted=False)
            for edge in self._inner_edges.get(id(sr), ()):
                # Behind a batcher or a key router: workers count items as they take
                # them, so these were never counted either.
                self.unfinish(sr, edge.leftovers(), counted=False)

    def collect_unread(self, taken: Iterable[Env] = (), *, queued: bool = True) -> None:
        """Once the run is over: the outputs made and counted by the last stage but
        never read (nor acked), listed so that they are not lost. For ``stream()``,
        whose reader is gone with its block: those it had ``taken`` from the outlet but
        not returned, then the outlet's own. For ``open(outputs=True)``, whose reader is
        another task that may read on after the block (``queued=False``): only those a
        stop kept from reaching the outlet; what is queued there stays readable."""
        edge = self.outlet_edge
        if self._unread_collected or edge is None:
            return
        self._unread_collected = True
        if queued:
            envs = [*taken, *edge.leftovers()]
        else:
            envs, edge.stranded = edge.stranded, []
        self.unread = [env.item for env in envs]

    # -- reading -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        end = self.t_end if self.t_end is not None else self.now()
        return end - self.t_start

    def stats(self) -> dict[str, StageStats]:
        now = self.t_end if self.t_end is not None else self.now()
        elapsed = now - self.t_start
        final = self.t_end is not None
        return {
            sr.name: sr.stats(now, elapsed, final=final)
            for sr in (*self.stages, *self.dead_letter_runs)
        }

    def primary_error(self, group: BaseExceptionGroup[Any]) -> BaseException | None:
        """The one exception a user should see for a failed run, or None to re-raise.

        A fail-fast ``StageError`` (or the source's own exception) rather than a group
        the user must dig through; but a group with anything that is not an ``Exception``
        (KeyboardInterrupt) or with several unrelated errors is re-raised as it is.
        """
        body = self.body_error
        if self.first_failure is None and isinstance(body, BaseExceptionGroup):
            # The caller's own group (from a nursery in the block) comes out whole, so
            # that ``except*`` sees every error in it.
            return body
        leaves = list(_leaves(group))
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if any(not isinstance(e, Exception) for e in real):
            return None
        first = self.first_failure
        if first is not None and any(e is first for e in real):
            others = [
                e for e in real if e is not first and not isinstance(e, trio.BrokenResourceError)
            ]
            if others:
                first.add_note(
                    f"{len(others)} more failure(s) before the run stopped: "
                    + "; ".join(str(e) for e in others[:5])
                )
            return first
        if len(real) == 1:
            return real[0]
        if real:
            # Several workers failed outside an item (a resource that cannot open):
            # the first error, with the others noted, rather than a nested group.
            first_real = real[0]
            first_real.add_note(
                f"{len(real) - 1} more error(s) in the same run: "
                + "; ".join(f"{type(e).__name__}: {e}" for e in real[1:6])
            )
            return first_real
        return None


class SignalGate:
    """SIGINT / SIGTERM for one run: the first stops the input and lets in-flight items
    finish within ``grace`` seconds, then cancels; a second cancels at once.

    Held around the whole ``trio.run`` (or the whole ``arun``), not just the run's
    nursery: a signal that lands while the run is tearing down (a process pool closing)
    is then part of the same stop, instead of a ``KeyboardInterrupt`` that replaces the
    :class:`Interrupted` carrying the result. A signal after the run has ended without
    being interrupted is raised again when the gate closes, as if it were never held.

    The handler is the process's, and several runs may be under way at once (two
    ``arun(handle_signals=True)`` in one program): while any gate is open, one handler
    (:meth:`_dispatch`) hands each signal to every open gate, so a Ctrl+C stops every
    run; the handlers found when the first gate opened are put back when the last one
    closes, in whatever order the runs end. Installed with ``signal.signal`` (main
    thread only) and handed to Trio with ``TrioToken.run_sync_soon``, the one Trio call
    that is safe in a signal handler.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    #: The gates open now, oldest first.
    _open: ClassVar[list[SignalGate]] = []
    #: The handlers :meth:`_dispatch` replaced, put back when the last gate closes.
    _replaced: ClassVar[dict[int, Any]] = {}
    #: Signals no open run took (each had ended): raised again when the last gate closes.
    _unclaimed: ClassVar[list[int]] = []

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._run: Run | None = None
        self._grace = 0.0
        self._early: list[_Landed] = []
        # Handed to Trio (run_sync_soon) and not yet delivered: if the run ends first,
        # they were never its (see connected).
        self._pending: list[_Landed] = []
        self._stopped = False

    def __enter__(self) -> SignalGate:
        if threading.current_thread() is not threading.main_thread():
            # As signal.signal says it, before anything process-wide is touched.
            raise ValueError("signal only works in main thread of the main interpreter")
        # Open before the handler is in: a signal from then on is this run's too.
        SignalGate._open.append(self)
        for signum in self.SIGNALS:
            handler = signal.getsignal(signum)
            if handler is None or handler is signal.SIG_IGN or handler is SignalGate._dispatch:
                # Ignored by whoever started the process (nohup, a job in the background
                # of a shell script): a Ctrl+C at the terminal is not for it. Or already
                # routed to every open gate. Or handled by C code that embeds Python
                # (uWSGI, say: getsignal() says None): its handler could not be put
                # back from Python, so the signal stays its own.
                continue
            previous = signal.signal(signum, SignalGate._dispatch)
            # What to put back is what the first gate found: a handler installed while
            # gates were open (Trio's open_signal_receiver in a stage) puts back what it
            # found itself when it ends.
            SignalGate._replaced.setdefault(signum, previous)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Signals that came before a run was connected (one that never started).
        for landed in self._early:
            landed.let_go()
        self._early.clear()
        gates = SignalGate._open
        gates.remove(self)
        if gates:
            return
        replaced = list(SignalGate._replaced.items())
        SignalGate._replaced.clear()
        try:
            _put_back(replaced)
        finally:
            # Read once the handlers are back: a signal until then is in it, and one
            # after goes to the program's own handler.
            unclaimed = SignalGate._unclaimed[:1]
            SignalGate._unclaimed.clear()
            if unclaimed:
                signal.raise_signal(unclaimed[0])

    @staticmethod
    def _dispatch(signum: int, frame: object) -> None:
        # Runs in the main thread between two bytecodes, wherever it happens to be.
        landed = _Landed(signum)
        for gate in list(SignalGate._open):
            gate._handle(landed)
        if not landed.holders and not landed.taken:
            SignalGate._unclaimed.append(signum)

    def _handle(self, landed: _Landed) -> None:
        """Hold ``landed`` for this gate's run (to deliver in Trio); nothing if its run
        has ended (and it did not ask for a stop): the signal is not for it."""
        if self._token is not None:
            landed.holders += 1
            self._pending.append(landed)
            self._token.run_sync_soon(self._deliver, landed)
        elif self._run is None and not self._stopped:
            landed.holders += 1
            self._early.append(landed)
        elif self._stopped:
            landed.taken = True  # a second signal after the stop it asked for has finished

    @contextlib.contextmanager
    def connected(self, run: Run, grace: float) -> Iterator[None]:
        """Route signals to ``run`` while the body runs (inside Trio)."""
        self._run, self._grace = run, grace
        self._token = trio.lowlevel.current_trio_token()
        for landed in self._early:
            self._pending.append(landed)
            self._token.run_sync_soon(self._deliver, landed)
        self._early.clear()
        try:
            yield
        finally:
            self._token = None
            # Signals the run ended before it saw (they landed as it finished): not
            # its, as if they came after; unless another run under way took them, raised
            # again when the last gate closes, which may be before Trio gets to deliver
            # them (arun). A stopped run's are part of its stop.
            pending, self._pending = self._pending, []
            for landed in pending:
                landed.taken = landed.taken or self._stopped
                landed.let_go()

    def _deliver(self, landed: _Landed) -> None:
        run = self._run
        if landed not in self._pending:
            return  # the run ended before this came: let go then (see connected)
        self._pending.remove(landed)
        if self._token is None or run is None:
            return
        landed.taken = True
        signum = landed.signum
        name = signal.Signals(signum).name
        self._stopped = True
        if run.interrupted_by is None:
            run.interrupted_by = signum
            run.log.warning("signal_received", signal=name, action="drain", grace=self._grace)
            run.stop_input(self._grace)
        else:
            run.log.warning("signal_received", signal=name, action="cancel")
            run.cancel()


class _Landed:
    """One signal as it landed, handed to every open gate: taken once one of them
    delivers it to its run; the program's own again (unclaimed) if none does."""

    __slots__ = ("holders", "signum", "taken")

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.holders = 0  # gates that may still deliver it
        self.taken = False

    def let_go(self) -> None:
        """A gate whose run ended before delivering it: the last one to let go of a
        signal no run took leaves it unclaimed."""
        self.holders -= 1
        if not self.holders and not self.taken:
            SignalGate._unclaimed.append(self.signum)


def _put_back(handlers: list[tuple[int, Any]]) -> None:
    """Put back each signal's handler that :meth:`SignalGate._dispatch` replaced, if it
    is still there; all of them, even if a signal lands between two (its handler, now
    the program's own again, may raise)."""
    if not handlers:
        return
    (signum, handler), rest = handlers[0], handlers[1:]
    try:
        if signal.getsignal(signum) is SignalGate._dispatch:
            signal.signal(signum, handler)
    finally:
        _put_back(rest)


def _leaves(group: BaseExceptionGroup[Any]) -> Iterable[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
