"""One stage during one run (:class:`StageRun`) and its worker loop: take, call, emit.

Everything else a stage can do lives elsewhere and is plugged in when the stage is
built: the call and its policy layers (``calls.py``), what a failure becomes
(``failures.py``), batching, key routing, reordering and autoscaling (``shapers.py``).
The loop itself only takes a chunk of waiting items, calls the user's function once per
item, counts, and hands the outputs on as one chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import attrs
import trio

from .._errors import Failed
from .._policies import BreakerRuntime, TokenBucket
from .._process import ProcessPool
from .._stage import Stage
from .._stats import StageCounters, StageSample, StageStats
from .calls import (
    Claim,
    GaveUp,
    Resume,
    drive,
    make_call,
    make_chunk_call,
    make_stepper,
    waiting_at,
    with_policies,
)
from .edge import CHUNK, CHUNK_BELOW, Edge
from .envelope import Env, KeyFailed
from .failures import POLICIES, TEARDOWN_LIMIT
from .forensics import (
    CALLING,
    SENDING,
    THROTTLED,
    WAITING,
    WorkerState,
    note_unstalled,
    stall_limit,
    worker_statuses,
)
from .runon import Lent, Running, abandon, drive_on, goes_on, run_on
from .shapers import Reorder, take_or_retire

if TYPE_CHECKING:
    from .run import Run


class OpenEnded(Exception):
    """A worker's resource raised, instead of ending, when the runner ended its open (no
    item was left for the worker): logged, and the worker ends as if it had ended."""


def error_answering_the_end(exc: BaseException) -> BaseException | None:
    """The error a resource's open raised in answer to the runner cancelling it, or None.

    An answer came from the cancellation: raised while handling it (``except Cancelled:
    raise OSError(...)``, its ``__context__`` kept even ``from None``), or beside it in
    a group, from a nursery inside the open (a happy-eyeballs connect). An error with no
    cancellation behind it is the open's own failure, even if it came after the runner
    asked it to stop (it raised before its first checkpoint): that still stops the run.
    A plain cancellation, or anything but ``Exception`` beside it, is no answer."""
    if isinstance(exc, BaseExceptionGroup):
        cancelled, rest = exc.split(trio.Cancelled)
        if cancelled is None or rest is None:
            return None
        errors, others = rest.split(Exception)
        if errors is None or others is not None:
            return None
        only = errors.exceptions[0] if len(errors.exceptions) == 1 else errors
        return only
    if not isinstance(exc, Exception):
        return None
    seen = 0
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None and seen < 16:  # a chain, bounded in case of a cycle
        if isinstance(cause, trio.Cancelled) or (
            isinstance(cause, BaseExceptionGroup) and cause.split(trio.Cancelled)[0] is not None
        ):
            return exc
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None


class Outbox(Protocol):
    """Where a stage's outputs go: the next stage's :class:`Edge`, or an outlet sink."""

    async def put(self, envs: list[Env]) -> float: ...

    def put_now(self, envs: list[Env], now: float | None = None) -> bool:
        """Hand ``envs`` over if that needs no waiting; False (and nothing done) if not.
        ``now``: the time, if the sender has just read the clock."""
        ...


class CollectSink:
    """The outlet of ``run()``: outputs kept in a list, each acked as it arrives."""

    def __init__(self, outputs: list[Any]) -> None:
        self.outputs = outputs

    async def put(self, envs: list[Env]) -> float:
        self.put_now(envs)
        return 0.0

    def put_now(self, envs: list[Env], now: float | None = None) -> bool:
        outputs = self.outputs
        for env in envs:
            outputs.append(env.item)
            if env.ack is not None:
                env.ack.done()
        return True


class DropSink:
    """The outlet of ``run(collect=False)`` and ``open()``: outputs acked and dropped."""

    async def put(self, envs: list[Env]) -> float:
        self.put_now(envs)
        return 0.0

    def put_now(self, envs: list[Env], now: float | None = None) -> bool:
        for env in envs:
            if env.ack is not None:
                env.ack.done()
        return True


def _resource_name(stage: Any, hooks: bool) -> str:
    if hooks:
        return f"{type(stage).__name__}.open_worker()/close_worker()"
    factory = stage.options.resource
    return f"resource={getattr(factory, '__name__', None) or repr(factory)}()"


def teardown_scope() -> trio.CancelScope:
    """Shielded from the run's cancellation, but for at most ``TEARDOWN_LIMIT`` s."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + TEARDOWN_LIMIT)


class StageRun:
    """One stage during one run: its counters, its edges, its workers."""

    def __init__(self, run: Run, stage: Stage[Any, Any], index: int) -> None:
        opts = stage.options
        self.run = run
        self.stage = stage
        self.opts = opts
        self.name = opts.name
        self.index = index
        self.is_dead_letter = index < 0
        # A dead-letter stage's input *is* Failed values; a main stage passes them on.
        self.passthrough = not self.is_dead_letter
        self.c = StageCounters(self.name)
        self.multi = opts.kind in ("asyncgen", "syncgen")
        self.batched = opts.batch is not None
        self.keyed = opts.key is not None
        self.takes_resource = opts.resource is not None or stage._has_worker_hooks
        self.limiter = trio.CapacityLimiter(opts.max_workers)
        self.bucket = TokenBucket(opts.rate, opts.burst or 1) if opts.rate else None
        self.breaker: BreakerRuntime | None = None
        if opts.breaker is not None:
            self.breaker = run.breaker_for(opts.breaker, self.name)
        self.simple = (
            opts.timeout is None
            and opts.retries is None
            and self.bucket is None
            and self.breaker is None
        )
        #: Seconds each worker task waited for a token or a breaker in its current item.
        self.throttled: dict[trio.lowlevel.Task, float] = {}
        #: What each worker is doing and since when (see forensics.py).
        self.workers: dict[trio.lowlevel.Task, WorkerState] = {}
        self.workers_started = 0
        self.process_pool: Any = None
        if opts.run_in == "process":
            self.process_pool = ProcessPool(self.name)
        base = make_call(self)
        self.call = base if self.simple else with_policies(self, base)
        self.chunk_call = make_chunk_call(self)
        # Thread chunks in flight, with their give-back, for the stage's watcher.
        self.claims: dict[Claim, Callable[[int], None]] = {}
        self.watching_claims = False
        self.stepper = make_stepper(self)
        # Take chunks only where an item that turns out to wait cannot hold the others
        # back: async functions are stepped (see _work), plain functions in threads go
        # to one call per chunk, inline plain functions cannot wait; an ordered or keyed
        # stage's items wait for each other anyway. Async generators and process stages
        # take one item at a time.
        self.can_chunk = opts.run_in != "process" and (
            self.stepper is not None
            or self.chunk_call is not None
            or (opts.run_in == "task" and opts.kind in ("sync", "syncgen"))
            or opts.ordered
            or self.keyed
        )
        self.policy = POLICIES[opts.errors](self)
        self.inbox = Edge(opts.buffer_size, run.now)
        self.inbox.numbered = opts.ordered or opts.key is not None
        self.out: Outbox = DropSink()
        # Ordered stages: ``reorder`` puts the outputs back in order (deposit), ``window``
        # is where workers take a slot per item before taking it (keyed stages take
        # slots in the router instead, which sees items in order). A run of ordered
        # stages shares one window (shapers.order_once): the first takes the slots, the
        # last restores the order, and the ones before the last tell it of ``holes``.
        self.reorder: Reorder | None = None
        if opts.ordered:
            self.reorder = Reorder(opts.max_workers, self)
        self.window = self.reorder if opts.ordered and not self.keyed else None
        self.holes: Reorder | None = None
        self.retire = 0  # workers asked to retire by the autoscaler
        #: Workers done taking items whose resource is closing (which may take a while):
        #: still in ``c.workers``, but not workers the autoscaler can count on.
        self.leaving = 0
        #: Workers opening their resource now: their cancel scopes, and the edge each
        #: will take items from (a keyed stage's workers have one each; see worker()).
        self.opening: dict[trio.CancelScope, Edge] = {}
        #: The waits of autoscaled workers idle now (shapers.take_or_retire), for the
        #: autoscaler to end one when it retires a worker.
        self.idle: set[trio.CancelScope] = set()
        self.workers_gone = trio.Event()
        self.nursery: trio.Nursery | None = None  # where the workers run
        # Items in a chunk run one after another: only while they are quick (see
        # CHUNK_BELOW). Until a first measurement, one at a time.
        self.chunked = False
        #: The next stage, where this stage's workers may take an item on themselves
        #: (runon.py; set by the run where that stage allows it), and the calls of
        #: this stage's function that a worker of an earlier stage began and handed to
        #: one of this stage's workers to finish (by the worker, until it takes it).
        self.runs_on_to: StageRun | None = None
        self.lent: dict[trio.lowlevel.Task, Lent] = {}
        # Below this many seconds per call a chunk's items count as quick (-1: never, for
        # a stage that cannot take chunks or has per-item policies that wait).
        self.quick_below = CHUNK_BELOW if self.can_chunk and self.simple else -1.0

    # -- wiring ------------------------------------------------------------------------------

    def connect(self, out: Outbox) -> None:
        self.out = out
        if self.reorder is not None:
            self.reorder.out = out

    def add_sender(self) -> None:
        if isinstance(self.out, Edge):
            self.out.add_sender()

    def sender_done(self) -> None:
        if isinstance(self.out, Edge):
            self.out.sender_done()

    def end_openings(self) -> None:
        """End the opens of workers that no item will ever come for: their edge has
        ended and nothing is left on it (or held). Called by a worker that is done, and
        by each edge its workers take from when that edge's last sender leaves
        (``Edge.on_end``, set by :meth:`start_worker`): every worker may be opening still
        (an open that never returns), with no worker done to notice."""
        for scope, edge in self.opening.items():
            if edge.drained():
                scope.cancel()

    def start_worker(
        self,
        nursery: trio.Nursery,
        inbox: Edge,
        seat: tuple[trio.lowlevel.Task, WorkerState] | None = None,
        first: tuple[Env, Lent] | None = None,
    ) -> None:
        """Start one worker on ``inbox`` (registered now, so no edge closes between).
        For running on (runon.py): ``seat``, the task and record of a worker it replaces
        (one that left to see a call of a later stage to its end), whose place in the
        counts and the live views it takes; ``first``, a call begun for this stage that
        it begins with."""
        self.nursery = nursery
        if self.takes_resource:
            inbox.on_end = self.end_openings
        inbox.add_receiver()
        self.add_sender()
        nursery.start_soon(
            self.worker, inbox, seat, first, name=f"pipeflow:{self.run.pipeline}:{self.name}"
        )

    def takes_lone_items(self) -> bool:
        """Whether the stage's workers take an item that comes alone through the lone
        item's lane (see _work): a plain ``async def`` with one argument, no resource,
        no per-item policy, one output per item, not batched, keyed, ordered or a
        dead-letter stage. (After the run has set up order: ``order_once``.)"""
        return (
            self.stepper is not None
            and not self.takes_resource
            and self.chunk_call is None
            and not self.multi
            and not self.batched
            and not self.keyed
            and self.reorder is None
            and self.window is None
            and not self.is_dead_letter
        )

    # -- the worker ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _resource(self, ended: Callable[[], bool]) -> AsyncIterator[Any]:
        """A worker's resource, closed on every exit path. The close runs shielded from
        the run's cancellation (a connection is closed properly even when the run is
        cancelled), but for at most ``TEARDOWN_LIMIT`` seconds.

        An error opening it stops the run, noted with the stage and the resource; an
        error closing it is logged (``resource_close_failed``, naming both) and does not
        undo the run: its items are done, and its result is kept. ``ended``: whether the
        runner has ended the open itself (no item is left for the worker, see
        :meth:`end_openings`); an open that then answers the cancellation with an error
        of its own (see :func:`error_answering_the_end`) is logged
        (``resource_open_end_failed``) and raises :class:`OpenEnded`, not a failure of
        the run: no item needed it."""
        hooks = self.stage._has_worker_hooks
        if not hooks and self.opts.resource is None:
            yield None
            return
        what = _resource_name(self.stage, hooks)
        try:
            if hooks:
                res = await self.stage.open_worker()
            else:
                manager = self.opts.resource()  # type: ignore[misc]
                res = await manager.__aenter__()
        except BaseException as exc:
            answer = error_answering_the_end(exc) if ended() else None
            if answer is not None:
                # A connect that turns the cancellation into its own error (OSError,
                # say): the run asked it to stop, and no item was waiting for it.
                self.run.log.error(
                    "resource_open_end_failed",
                    stage=self.name,
                    resource=what,
                    error=f"{type(answer).__name__}: {answer}",
                )
                raise OpenEnded from exc
            if isinstance(exc, Exception):
                exc.add_note(f"stage {self.name!r}: its resource {what} failed to open")
                # The run stops on it as on an item's failure: no more input, and an
                # acking source is told that the run failed (it would wait for acks that
                # cannot come, or the source's task would stop the run first, on a
                # closed stage).
                self.run.fail(exc)
            raise
        error: BaseException | None = None
        try:
            yield res
        except BaseException as exc:
            error = exc
            raise
        finally:
            with teardown_scope():
                try:
                    if hooks:
                        await self.stage.close_worker(res)
                    elif error is None:
                        await manager.__aexit__(None, None, None)
                    else:
                        await manager.__aexit__(type(error), error, error.__traceback__)
                except Exception as exc:
                    self.run.log.error(
                        "resource_close_failed",
                        stage=self.name,
                        resource=what,
                        error=f"{type(exc).__name__}: {exc}",
                    )

    async def worker(
        self,
        inbox: Edge,
        seat: tuple[trio.lowlevel.Task, WorkerState] | None = None,
        first: tuple[Env, Lent] | None = None,
    ) -> None:
        c = self.c
        now = self.run.now
        task = trio.lowlevel.current_task()
        if seat is None:
            c.workers += 1
            if first is None:
                # (A worker started for a call whose waiting worker a stop took away
                # stands in for that one, which is leaving: not a worker more.)
                c.workers_peak = max(c.workers_peak, c.workers)
            c.worker_time -= now()
            self.workers[task] = WorkerState(self.workers_started, now())
            self.workers_started += 1
        else:
            # Counted already, as the worker it replaces, whose record stayed in the
            # live views until now (so no round shows the stage a worker short).
            left, ws = seat
            del self.workers[left]
            self.workers[task] = ws
        leaving = False
        running: Running | None = None  # a call of a later stage this worker left for
        try:
            if self.takes_resource:
                with trio.CancelScope() as opening:
                    # While its resource opens (a connect that may never return), the
                    # worker is away for its inbox (items wake a worker that can take
                    # them), and it is ended if the stage's input ends meanwhile: its
                    # items are done without it (see below).
                    self.opening[opening] = inbox
                    if inbox.drained():
                        opening.cancel()  # ended before this worker started
                    inbox.away += 1
                    try:
                        async with self._resource(lambda: opening.cancel_called) as res:
                            del self.opening[opening]
                            inbox.away -= 1
                            try:
                                await self._work(inbox, res)
                            finally:
                                leaving = True
                                self.leaving += 1
                    except OpenEnded:
                        pass  # logged: the worker ends as if its open had
                    finally:
                        if opening in self.opening:  # it never opened
                            del self.opening[opening]
                            inbox.away -= 1
            else:
                running = await self._work(inbox, None, first)
            if self.opening:
                # No item is left for a worker still opening its resource on an edge
                # that has ended (this one's, or a keyed stage's other edges).
                self.end_openings()
        except BaseException as exc:
            if running is not None:
                # A KeyboardInterrupt before the call it left for is driven: the worker
                # holding that call must not wait for it (its wait is shielded).
                abandon(running, exc)
            raise
        finally:
            if leaving:
                self.leaving -= 1
            inbox.receiver_done()
            self.sender_done()
            if running is None:
                del self.workers[task]
                c.workers -= 1
                c.worker_time += now()
                if c.workers == 0:
                    self.workers_gone.set()
                    if self is self.run.stages[-1]:
                        # Every item has left the main stages: no more dead letters.
                        self.run.close_dead_letters()
        if running is not None:
            # Its seat passed to a new worker: this task is now only the call's.
            await drive_on(running, now)

    async def _work(
        self, inbox: Edge, res: Any, first: tuple[Env, Lent] | None = None
    ) -> Running | None:
        c = self.c
        now = self.run.now
        call = self.call
        chunk_call = self.chunk_call
        multi = self.multi
        batched = self.batched
        keyed = self.keyed
        passthrough = self.passthrough
        reorder = self.reorder
        window = self.window
        policy = self.policy
        # Only where items may be taken back by another worker: not a keyed worker's own
        # edge (one key, one worker, its items in order).
        stepper = self.stepper if not keyed else None
        one_arg = not self.takes_resource
        # A simple async function called as it is (no wrapper coroutine around it).
        direct = self.stepper if one_arg else None
        autoscale = self.opts.autoscale
        min_workers = self.opts.min_workers
        task = trio.lowlevel.current_task()
        ws = self.workers[task]
        spins = 0
        idle_since = -1.0  # when the chunk just recorded ended (it went on at once)
        # The lone item's lane (below): an item alone, of a plain async stage, that goes
        # straight on. What it skips is the general path's set-up for chunks, thread
        # calls, several outputs, order and batches: about a third of a hop's own work
        # at low load, where items travel alone and latency is made of that work.
        lone_lane = self.takes_lone_items()
        lone_call = cast("Callable[[Any], Awaitable[Any]]", direct)  # when lone_lane
        # A call of this stage's function begun by a worker of an earlier stage and
        # handed to this worker with its item (runon.py): always a lone item, and only
        # to a stage with the lane.
        lent: Lent | None = None
        # A worker started for such a call (runon._hand) begins with it.
        pending: list[Env] | None = None
        if first is not None:
            pending = [first[0]]
            lent = first[1]
        # A lone item that failed: its outcome and its start, for the general path.
        lone_failure: list[tuple[Exception | None, Any]] | None = None
        lone_t0 = 0.0
        while True:
            if autoscale and self.retire and c.workers > min_workers:
                self.retire -= 1
                return None
            limit = CHUNK if self.chunked else 1
            if window is not None:
                # Slots for the items waiting now: a worker that waits for items holds
                # one slot, not a chunk's worth that the others could use.
                limit = await window.reserve(min(limit, max(1, len(inbox))))
            try:
                if pending is None:
                    chunk = inbox.take_ready(limit)
                else:
                    chunk, pending = pending, None
            except trio.EndOfChannel:
                if window is not None:
                    window.release(limit)
                return None
            if chunk:
                spins += len(chunk)
            else:
                ws.state = WAITING
                ws.since = idle_since if idle_since >= 0.0 else now()
                try:
                    got = await (
                        inbox.take(limit, empty=True)
                        if not autoscale
                        else take_or_retire(self, inbox, limit)
                    )
                except trio.EndOfChannel:
                    got = None
                except BaseException:
                    if window is not None:
                        window.release(limit)
                    raise
                if got is None:
                    if window is not None:
                        window.release(limit)
                    return None
                chunk = got
                spins = 0
                if self.lent:
                    lent = self.lent.pop(task, None)
                if (
                    limit < CHUNK
                    and self.chunked
                    and window is None
                    and lent is None
                    and len(inbox)
                ):
                    # It waited from before its stage's items were known to be quick
                    # and was woken for a burst: the edge woke one worker for a chunk
                    # of it (wake_all off), so this one takes the chunk, not one item
                    # the rest would wait behind if its call waits.
                    chunk.extend(inbox.take_ready(CHUNK - len(chunk)))
            idle_since = -1.0
            if window is not None and limit > len(chunk):
                window.release(limit - len(chunk))

            n = len(chunk)
            if lone_lane and n == 1 and type(chunk[0].item) is not Failed:
                env = chunk[0]
                borrowed, lent = lent, None
                if spins >= CHUNK:
                    spins = 0
                    try:
                        await trio.lowlevel.checkpoint()
                    except BaseException:
                        # A stop took the item before it was counted: cancelled, listed.
                        self.run.unfinish(self, chunk, counted=False)
                        raise
                c.items_in += 1
                c.inflight += 1
                t0 = now() if borrowed is None else borrowed.t0
                ws.since = t0
                ws.state = CALLING
                ws.chunk = chunk
                ws.at = 0
                c.busy_workers += 1
                inbox.away += 1  # as in the general path (Edge.away)
                try:
                    result = await (lone_call(env.item) if borrowed is None else borrowed.outcome())
                except Exception as exc:
                    # The general path deals with the failure, its call already made.
                    inbox.away -= 1
                    c.busy_workers -= 1
                    c.items_in -= 1
                    c.inflight -= 1
                    lone_failure = [(exc, None)]
                    lone_t0 = t0
                except BaseException:
                    inbox.away -= 1
                    self._record(ws, t0, env.t, chunk, 1, task, end=now(), stopped=True)
                    self.run.unfinish(self, chunk)
                    raise
                else:
                    inbox.away -= 1
                    c.ok += 1
                    c.items_out += 1
                    c.inflight -= 1
                    env.item = result
                    queued_at = env.t  # before the hand-on restamps it
                    end = now() if borrowed is None else borrowed.end
                    nxt = self.runs_on_to
                    if goes_on(nxt, result):
                        # The next stage has a worker with nothing to do: take the item
                        # on through it here, without a scheduler round (runon.py).
                        self._record_one(ws, t0, queued_at, end)
                        inbox.wake_all = not self.chunked
                        idle_since = end
                        running = run_on(nxt, env, end)
                        if running is None:
                            continue
                        # Its call waits (I/O): this task sees it to its end (its cancel
                        # scopes are this task's) while a worker of that stage holds it
                        # as its own; a new worker takes this one's seat here meanwhile,
                        # so that this stage keeps all its workers.
                        assert self.nursery is not None
                        self.start_worker(self.nursery, inbox, seat=(task, ws))
                        return running
                    if self.out.put_now(chunk, end):
                        self._record_one(ws, t0, queued_at, end)
                        inbox.wake_all = not self.chunked
                        idle_since = end
                        continue
                    self._record_one(ws, t0, queued_at, end)
                    inbox.wake_all = not self.chunked
                    await self._wait_for_room(inbox, self.out.put(chunk))
                    continue
            if chunk_call is not None:
                stuck = [False]

                def give_back(k: int, chunk: list[Env] = chunk, stuck: list[bool] = stuck) -> None:
                    # An item blocks in the thread (the stage's watcher says so, see
                    # calls.watch_claims): the ones after it go back for idle workers,
                    # this worker is away (Edge.away) until the thread returns, and the
                    # stage takes one item at a time again.
                    self._give_back(inbox, chunk, k)
                    self.chunked = False
                    stuck[0] = True
                    inbox.away += 1

            # Items of this chunk may go back to the inbox (an item that turns out slow):
            # until this worker is done with it, the inbox's end is not the end.
            holding = n > 1 and (stepper is not None or chunk_call is not None)
            if holding:
                inbox.hold()
            weight = sum(e.weight(True) for e in chunk) if batched else n
            c.items_in += weight
            c.inflight += weight
            outs: list[Env] = []  # unordered stages
            results: list[tuple[int, list[Env]]] = []  # ordered stages: by input position
            done = 0  # chunk[:done] are accounted for; their outputs are in outs/results
            # ... but for loose[loose_from:]: failures not yet dealt with (stepped chunks).
            loose: list[Env] = []
            loose_from = 0
            calls = 0
            ok_w = ok_n = 0  # items with one output (weight, count): counted per chunk
            handed_over = False
            busy = False
            calling = False
            t0 = 0.0
            # When the chunk's first item was handed to this stage: read now, as the
            # hand-on restamps the envelopes (they travel on as the outputs).
            queued_at = chunk[0].t
            try:
                if spins >= CHUNK:
                    spins = 0
                    await trio.lowlevel.checkpoint()
                # After the checkpoint: others' time is not this chunk's. (A lone item
                # that failed was called at lone_t0.)
                t0 = now() if lone_failure is None else lone_t0
                ws.since = t0
                ws.state = CALLING
                ws.chunk = chunk
                ws.at = 0
                c.busy_workers += 1
                busy = True
                # While this worker calls the stage's function in its own task, items
                # handed to its inbox wake a waiting worker: if a hand-over happens
                # meanwhile, the call has let other tasks run (it waits: I/O), and no
                # one should queue behind it (see Edge.away). A thread chunk's call
                # is not counted: its round trip is short, and the stage's chunks stay
                # whole.
                if chunk_call is None:
                    inbox.away += 1
                    calling = True
                in_thread = -1.0  # seconds the items took in a worker thread, if they did
                if stepper is not None and n > 1:
                    # async def items, run by one driver (calls.drive): no scheduler round
                    # and no StopIteration per item while they finish without waiting.
                    # (One item alone is simply awaited below: nothing could be given
                    # back, and an item that waits, I/O, then resumes without a trampoline.)
                    failures: list[tuple[int, Exception | None]] = []
                    gen = drive(stepper, chunk, failures, res, one_arg, passthrough)
                    start = calls_passed = 0
                    try:
                        trap = gen.send(None)
                    except StopIteration as stop:
                        ran = stop.value
                    else:
                        # Item k waits: it is I/O. The items after it go back for idle
                        # workers, the outputs made so far go on at once, and the stage
                        # takes one item at a time again. Nothing may be awaited before
                        # Resume: the scheduler will wake this task for item k's trap.
                        k = waiting_at(gen)
                        if k + 1 < n:
                            self._give_back(inbox, chunk, k + 1)
                            n = len(chunk)
                        self.chunked = False
                        if k:
                            # Failed values passing through go on with the outputs; the
                            # failures wait for the item (their hand-over may wait).
                            passing = [chunk[i] for i, raised in failures if raised is None]
                            failures[:] = [f for f in failures if f[1] is not None]
                            bad = {i for i, _ in failures}
                            early = [env for i, env in enumerate(chunk[:k]) if i not in bad]
                            loose = [chunk[i] for i, _ in failures]
                            e = len(early) - len(passing)
                            c.ok += e
                            c.items_out += e
                            c.inflight -= len(early)
                            c.items_in -= len(passing)
                            c.passed += len(passing)
                            calls_passed = len(passing)
                            if reorder is not None:
                                # Ordered: they leave in turn, deposited with the rest.
                                results.extend((env.seq, [env]) for env in early)
                            elif early:
                                self._hand_on_soon(early)
                        done = start = k
                        ws.at = k
                        ran = await Resume(gen, trap)
                    # An item failed: the ones after it have not started. They go back
                    # (for any worker) once its failure has been dealt with here: if it
                    # stops the run, they never start.
                    rest = n - ran
                    n = ran
                    # Every item has run: the successes go on as they are; failures (and
                    # Failed values passing through) are dealt with one by one, in place,
                    # so a 1-worker stage keeps its order.
                    done = n
                    calls = n - calls_passed
                    if not failures:
                        if reorder is None:
                            outs = chunk if not start else chunk[start:]
                        else:
                            results.extend((env.seq, [env]) for env in chunk[start:])
                        ok_w = ok_n = n - start
                    else:
                        loose = [chunk[i] for i, _ in failures]
                        ok_w = ok_n = n - start - sum(1 for i, _ in failures if i >= start)
                        after = start  # chunk[after:] are not in outs (results) yet
                        for i, raised in failures:
                            env = chunk[i]
                            loose_from += 1
                            if i >= after:
                                if reorder is None:
                                    outs.extend(chunk[after:i])
                                else:
                                    results.extend((e.seq, [e]) for e in chunk[after:i])
                                after = i + 1
                            if raised is None:
                                self._pass_on(env, outs, results)
                                calls -= 1
                            else:
                                produced = await self._fail(env, raised, 1, 1, task)
                                await self._place(env, produced, outs, results, task)
                        if reorder is None:
                            outs.extend(chunk[after:n])
                        else:
                            results.extend((e.seq, [e]) for e in chunk[after:n])
                        if rest:
                            self._give_back(inbox, chunk, n)
                else:
                    outcomes, lone_failure = lone_failure, None
                    if chunk_call is not None:
                        outcomes, in_thread = await chunk_call(
                            [e.item for e in chunk],
                            res,
                            None if window is not None else give_back,
                        )
                        if stuck[0]:
                            stuck[0] = False
                            inbox.away -= 1
                        if len(outcomes) < len(chunk):
                            # An item turned slow in the thread: the ones after it go
                            # back for idle workers; one item at a time again.
                            self._give_back(inbox, chunk, len(outcomes))
                            self.chunked = False
                        n = len(chunk)
                    for env in chunk:
                        item = env.item
                        if passthrough and type(item) is Failed:
                            self._pass_on(env, outs, results)
                            done += 1
                            continue
                        if keyed and type(item) is KeyFailed:
                            env.item = item.item
                            done += 1
                            produced = await policy.fail(env, item.error, 1, 1)
                            calls += 1
                            await self._place(env, produced, outs, results, task)
                            continue
                        w = len(item) if batched else 1
                        calls += 1
                        error: Exception | None = None
                        if outcomes is not None:
                            error, result = outcomes[done]
                        else:
                            ws.at = done
                            try:
                                if direct is not None:
                                    result = await direct(item)
                                else:
                                    result = await call(item, res)
                            except Exception as exc:
                                error = exc
                        done += 1
                        if error is not None:
                            attempts = 1
                            if isinstance(error, GaveUp):
                                attempts = error.attempts
                                error = error.error
                            produced = await self._fail(env, error, attempts, w, task)
                            await self._place(env, produced, outs, results, task)
                            continue
                        if not multi:
                            ok_w += w
                            ok_n += 1
                            env.item = result
                            if reorder is not None:
                                results.append((env.seq, [env]))
                            else:
                                outs.append(env)
                            continue
                        c.inflight -= w
                        k = len(result)
                        if k == 0:
                            c.filtered += w
                            if env.ack is not None:
                                env.ack.done()
                            if reorder is not None:
                                results.append((env.seq, []))
                            continue
                        c.ok += w
                        c.items_out += k
                        ack = env.ack
                        if ack is not None and k > 1:
                            ack.add(k - 1)
                        env.item = result[0]
                        if reorder is not None:
                            results.append((env.seq, [env, *(Env(x, ack) for x in result[1:])]))
                        else:
                            outs.append(env)
                            outs.extend(Env(x, ack) for x in result[1:])
                if calling:
                    inbox.away -= 1
                    calling = False
                # Statistics once per chunk: two clock reads, histograms by weight.
                if ok_n:
                    c.ok += ok_w
                    c.items_out += ok_n
                    c.inflight -= ok_w
                    ok_w = ok_n = 0
                busy = False
                if holding:
                    holding = False
                    inbox.release()
                end = now()
                if reorder is None and outs and self.out.put_now(outs, end):
                    # Handed on without waiting (the usual case). The bookkeeping is
                    # done now, in this step: the worker (or reader) the hand-over woke
                    # runs in the next scheduler round whatever this one does. (Stepping
                    # aside first, to record after the woken one, was a scheduler step
                    # more per hop, and Trio runs a round's tasks in either order, so it
                    # recorded first in half the rounds anyway, and items in flight
                    # together overtook each other: slower at low load, p50 and p99;
                    # docs/performance.md.)
                    handed_over = True
                    self._record(ws, t0, queued_at, chunk, calls, task, in_thread, end=end)
                    inbox.wake_all = not self.chunked
                    idle_since = end
                    continue
                self._record(ws, t0, queued_at, chunk, calls, task, in_thread, end=end)
                inbox.wake_all = not self.chunked
                handed_over = True
                if not outs and reorder is None:
                    continue
                await self._wait_for_room(
                    inbox,
                    reorder.deposit(results) if reorder is not None else self.out.put(outs),
                )
            except BaseException:
                if calling:
                    inbox.away -= 1
                if chunk_call is not None and stuck[0]:
                    inbox.away -= 1
                if holding:
                    inbox.release()
                if ok_n:
                    c.ok += ok_w
                    c.items_out += ok_n
                    c.inflight -= ok_w
                if busy:
                    self._record(ws, t0, queued_at, chunk, calls, task, end=now(), stopped=True)
                # A stop (or a failure) took these items from this worker: count them,
                # list them, and keep the outputs made but not handed on.
                self.run.unfinish(self, [*loose[loose_from:], *chunk[done:]])
                if not handed_over:
                    self.run.strand(self, outs, results)
                raise

    async def _wait_for_room(self, inbox: Edge, hand_on: Awaitable[float]) -> None:
        """Await ``hand_on`` (a put or an ordered deposit, which may wait for room
        downstream) as blocked time; meanwhile the worker is away for its inbox
        (Edge.away): items that come wake another worker."""
        inbox.away += 1
        try:
            blocked = await hand_on
        finally:
            inbox.away -= 1
        if blocked:
            self.c.blocked_time += blocked

    async def _place(
        self,
        env: Env,
        produced: list[Env],
        outs: list[Env],
        results: list[tuple[int, list[Env]]],
        task: trio.lowlevel.Task,
    ) -> None:
        """Put what a failed item left (``produced``) with the chunk's outputs: by its
        position for an ordered stage. In an order-once group, an item that left
        nothing is a hole the group's window is told of; handing on the run the hole
        completes is blocked time, not the failed item's work."""
        if self.reorder is not None:
            results.append((env.seq, produced))
        elif produced:
            outs.extend(produced)
        elif self.holes is not None:
            since = self.run.now()
            try:
                self.c.blocked_time += await self.holes.deposit([(env.seq, [])])
            finally:
                self._not_busy_since(task, since)

    async def _fail(
        self, env: Env, error: Exception, attempts: int, weight: int, task: trio.lowlevel.Task
    ) -> list[Env]:
        """A failed item to the error policy; the outputs it leaves (if any). The
        hand-over to a dead-letter sink is not the item's work: not busy time."""
        since = self.run.now()
        try:
            return await self.policy.fail(env, error, attempts, weight)
        finally:
            self._not_busy_since(task, since)

    def _not_busy_since(self, task: trio.lowlevel.Task, since: float) -> None:
        """The time since ``since`` was not the item's work: not in busy time (the
        chunk's record subtracts it), so a stage is not mistaken for the bottleneck."""
        self.throttled[task] = self.throttled.get(task, 0.0) + (self.run.now() - since)

    def _pass_on(self, env: Env, outs: list[Env], results: list[tuple[int, list[Env]]]) -> None:
        """An upstream failure travelling as a value (``Failed``): passed on untouched,
        counted as ``passed``, not as an item of this stage."""
        c = self.c
        c.items_in -= 1
        c.inflight -= 1
        c.passed += 1
        if self.reorder is not None:
            results.append((env.seq, [env]))
        else:
            outs.append(env)

    def _hand_on_soon(self, outs: list[Env]) -> None:
        """Hand ``outs`` on without waiting for the item now in this worker: at once if
        they fit, else from a task of their own (the edge stays open for it)."""
        if self.out.put_now(outs):
            return
        assert self.nursery is not None
        self.add_sender()

        async def hand_on() -> None:
            try:
                blocked = await self.out.put(outs)
                self.c.blocked_time += blocked
            finally:
                self.sender_done()

        self.nursery.start_soon(hand_on, name=f"pipeflow:{self.run.pipeline}:{self.name}:hand-on")

    def _give_back(self, inbox: Edge, chunk: list[Env], start: int) -> None:
        """Return ``chunk[start:]`` (not started) to the front of ``inbox``, with their
        window slots if the stage takes any (the worker that takes them takes new ones)."""
        back = chunk[start:]
        del chunk[start:]
        if self.window is not None:
            self.window.release(len(back))
        weight = sum(e.weight(self.batched) for e in back)
        self.c.items_in -= weight
        self.c.inflight -= weight
        inbox.wake_all = True
        inbox.put_back(back)

    def _record(
        self,
        ws: WorkerState,
        t0: float,
        queued_at: float,
        chunk: list[Env],
        calls: int,
        task: trio.lowlevel.Task,
        in_thread: float = -1.0,
        *,
        end: float,
        stopped: bool = False,
    ) -> None:
        """A chunk's statistics (it ended at ``end``): busy time, queue wait (since
        ``queued_at``) and durations, by weight.
        ``in_thread``: the items' own time in a worker thread, without the round trip
        to it, which is what decides whether the stage's items are quick."""
        c = self.c
        d = end - t0
        # Time spent waiting for a rate-limit token or a held breaker, or handing a
        # failure to a dead-letter sink, is not work: it must not make the stage look
        # busy (or name it the bottleneck).
        if self.throttled:
            d -= self.throttled.pop(task, 0.0)
        if ws.stalled:
            note_unstalled(self, ws, d, stopped=stopped)
        ws.state = SENDING
        ws.since = end
        c.busy_workers -= 1
        ws.chunk = None
        c.busy_time += d
        c.waits.observe_many(t0 - queued_at, len(chunk))
        if calls:
            c.durations.observe_many(d / calls, calls)
            # Only a stage with no per-item policy: retries, timeouts and rate limits
            # wait, and their waits must overlap as they always have (quick_below).
            work = in_thread if in_thread >= 0.0 else d
            self.chunked = work <= self.quick_below * calls

    def _record_one(self, ws: WorkerState, t0: float, queued_at: float, end: float) -> None:
        """:meth:`_record` for the lone item's lane: one item, one call, that went well.
        (Such a stage has no rate limit or breaker and its item went to no dead-letter
        sink: nothing throttled it.) Its first lines repeat :meth:`_record`'s on
        purpose: this runs once per item per stage at low load, where a shared helper
        would cost a call on every hop (the two differ in what they observe)."""
        c = self.c
        d = end - t0
        if ws.stalled:
            note_unstalled(self, ws, d, stopped=False)
        ws.state = SENDING
        ws.since = end
        c.busy_workers -= 1
        ws.chunk = None
        c.busy_time += d
        c.waits.observe(t0 - queued_at)
        c.durations.observe(d)
        self.chunked = d <= self.quick_below

    # -- reading -----------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Items waiting in front of this stage now."""
        return len(self.inbox)

    def oldest_inflight(self, now: float) -> float:
        """Seconds the oldest item now in a worker has been there (0 when none is)."""
        oldest = min(
            (ws.since for ws in self.workers.values() if ws.state in (CALLING, THROTTLED)),
            default=now,
        )
        return now - oldest

    def throttled_now(self, now: float) -> float:
        """Seconds the workers waiting for a token or a held breaker right now have
        waited so far: the throttled time not yet in the counters (added when a wait
        ends), so that throttled time over any window is that window's share."""
        return sum(
            now - ws.throttled_since for ws in self.workers.values() if ws.state == THROTTLED
        )

    def sample(self, now: float) -> StageSample:
        """This stage's figures for an exporter (see :class:`StageSample`)."""
        c = self.c
        return StageSample.of(
            c,
            throttled_now=self.throttled_now(now),
            inflight=c.inflight,
            queue_depth=self.queue_depth(),
            workers=c.workers,
            busy_workers=c.busy_workers,
            breaker_state=self.breaker.state if self.breaker is not None else None,
            oldest_inflight_seconds=self.oldest_inflight(now),
            stalled_workers=sum(w.stalled for w in worker_statuses(self, now)),
            stall_after_seconds=stall_limit(self),
        )

    def stats(self, now: float, elapsed: float, *, final: bool = False) -> StageStats:
        state = self.breaker.state if self.breaker is not None else None
        stats = self.c.snapshot(
            now,
            elapsed,
            queue_depth=self.queue_depth(),
            breaker_state=state,
            oldest_inflight=self.oldest_inflight(now),
            final=final,
        )
        waiting = self.throttled_now(now)
        if waiting:
            stats = attrs.evolve(stats, throttled_seconds=stats.throttled_seconds + waiting)
        return stats
