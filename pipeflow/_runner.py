"""The runner: one Trio nursery, one bounded memory channel per edge, N workers per stage.

Shape of a run (the trio docs' ``channels-mpmc-fixed`` pattern, once per stage)::

    intake ──ch0──▶ stage 0 workers ──ch1──▶ stage 1 workers ──▶ … ──▶ outlet

Every worker holds its own clone of its input and output channel and closes them when
it leaves, so when the source ends the close cascades stage by stage: a stage's output
closes once its last worker has finished its in-flight items. Everything runs in one
nursery, so one cancel scope stops every worker at once, and the nursery guarantees
that no task outlives the run.

Hot path: a handoff that would not block skips the scheduler (``*_nowait`` first), and a
worker that never had to wait checkpoints every few items so cancellation stays prompt
and no task starves. Statistics are plain attribute updates on a ``StageCounters``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import signal
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, cast

import trio

from ._errors import CircuitOpen, Failed, StageError, short_repr
from ._log import get_logger
from ._policies import BreakerRuntime, BreakerState, CircuitBreaker, TokenBucket
from ._stage import Stage
from ._stats import StageCounters, StageStats

#: Items a worker handles without waiting before it checkpoints anyway.
_SPIN_LIMIT = 32
#: The reorder window of an ordered stage, in items per worker.
_WINDOW_PER_WORKER = 4
_MIN_WINDOW = 16

# Autoscaling (workers=(min, max)): the seed's watermark supervisor with hysteresis.
_SCALE_INTERVAL = 1.0  # seconds between decisions
_GROW_AT = 0.8  # input queue this full (or upstream blocked): grow by half, at least 1
_SHRINK_AT = 0.2  # input queue this empty, and no change for a cooldown: retire one
_SHRINK_COOLDOWN = 5.0
_IDLE_RETIRE = 30.0  # a worker idle this long retires (never below min)

Outlet = Literal["collect", "drop", "channel"]


def stable_hash(key: object) -> int:
    """A hash of a routing key that is the same in every process (unlike ``hash()`` of a
    str, which Python randomises per process): CRC-32 of its canonical bytes."""
    if isinstance(key, bytes):
        data = key
    elif isinstance(key, str):
        data = key.encode()
    else:
        data = repr(key).encode()
    return zlib.crc32(data)


class _KeyFailed:
    """An item whose key function raised: routed to a worker to fail there, by policy."""

    __slots__ = ("error", "item")

    def __init__(self, item: Any, error: Exception) -> None:
        self.item = item
        self.error = error


class _BatchAck:
    """The acks of a batch's items, done together once the batch's outputs are done."""

    __slots__ = ("acks", "pending")

    def __init__(self, acks: list[Ack]) -> None:
        self.acks = acks
        self.pending = 1

    def add(self, n: int) -> None:
        self.pending += n

    def done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            for ack in self.acks:
                ack.done()


class Ack(Protocol):
    """Completion tracking for sources that must know when an item is done (acks).

    A source that needs acks has a method ``__pipeflow_open__(*, capacity: int)``
    returning an async context manager that yields an async iterator of
    ``(item, ack)`` pairs (``ack`` may be None). ``capacity`` is how many items the run
    can hold at once; a source should keep no more than that many un-acked.

    ``add(n)`` says one item became ``n + 1`` (a flat-map's children); ``done()`` says
    one of them has left the pipeline: through the outlet, filtered, skipped, collected
    or dead-lettered. A fail-fast failure does not call ``done()``.
    """

    def add(self, n: int) -> None: ...
    def done(self) -> None: ...


class Env:
    """What travels with an item between stages."""

    __slots__ = ("ack", "item", "seq", "t")

    def __init__(self, item: Any, seq: int, t: float, ack: Ack | None) -> None:
        self.item = item
        self.seq = seq  # position in the channel it is in, for ordered stages
        self.t = t  # when it entered that channel, for queue wait
        self.ack = ack


class _RunFailed(Exception):
    """Raised into an acking source's context when the run failed (see Run.pump)."""


class _GaveUp(Exception):
    """An item's last attempt failed; carries the attempt count to the failure path."""

    def __init__(self, error: Exception, attempts: int) -> None:
        self.error = error
        self.attempts = attempts


class TooManyFailures(StageError):
    """A stage's or the pipeline's error budget (``max_failures=``) ran out: the run
    stops. ``item`` is the item whose failure went over the budget (None when a
    fractional budget is found exceeded at the end of the stream)."""

    def __init__(
        self,
        stage: str,
        item: object,
        error: BaseException,
        *,
        attempts: int = 1,
        message: str | None = None,
    ) -> None:
        super().__init__(stage, item, error, attempts=attempts)
        if message is not None:
            self.args = (message,)


class StageRun:
    """One stage during one run: its workers, counters and ordering state."""

    def __init__(self, run: Run, stage: Stage[Any, Any], index: int) -> None:
        self.run = run
        self.stage = stage
        self.opts = stage.options
        self.name = stage.options.name
        self.index = index
        self.c = StageCounters(self.name)
        self.in_seq = 0  # next sequence number on this stage's input channel
        self.next: StageRun | None = None
        self.recv: trio.MemoryReceiveChannel[Env] | None = None
        opts = self.opts
        self.multi = opts.kind in ("asyncgen", "syncgen")
        self.ordered = opts.ordered
        self._window: trio.Semaphore | None = None
        self.window_size = 0
        if opts.ordered:
            self.window_size = max(_MIN_WINDOW, _WINDOW_PER_WORKER * opts.max_workers)
            self._window = trio.Semaphore(self.window_size)
        # Keyed stages take window slots in the dispatcher, which sees items in order.
        self._workers_take_window = opts.ordered and opts.key is None
        self.batched = opts.batch is not None
        self.keyed = opts.key is not None
        self._retire = 0  # workers asked to retire by the autoscaler
        self._workers_gone = trio.Event()
        self._ready: dict[int, list[Env]] = {}
        self._next_out = 0
        self._flushing = False
        self._limiter = trio.CapacityLimiter(opts.max_workers)
        self._bucket = TokenBucket(opts.rate, opts.burst or 1) if opts.rate else None
        self._breaker: BreakerRuntime | None = None
        if opts.breaker is not None:
            self._breaker = run.breaker_for(opts.breaker, self.name)
        self._simple = (
            opts.timeout is None
            and opts.retries is None
            and self._bucket is None
            and self._breaker is None
        )
        self._rng = random.Random()
        self._throttled: dict[trio.lowlevel.Task, float] = {}
        self.process_pool: Any = None
        self._call = self._make_call()
        self._emit: Callable[[Env, Any], Awaitable[None]] = self._emit_collect
        self._dead_letter = self._make_dead_letter()

    # -- building -------------------------------------------------------------------------

    def _make_call(self) -> Callable[[Any, Any], Awaitable[Any]]:
        opts = self.opts
        target = self.stage._target()
        takes_resource = opts.resource is not None or self.stage._has_worker_hooks
        limiter = self._limiter
        thread_name = f"pipeflow:{self.run.pipeline}:{self.name}"

        if opts.kind == "async":
            if takes_resource:
                return target

            async def call_async(item: Any, _: Any) -> Any:
                return await target(item)

            return call_async

        if opts.kind == "asyncgen":

            async def call_agen(item: Any, res: Any) -> Any:
                agen = target(item, res) if takes_resource else target(item)
                async with contextlib.aclosing(agen):
                    return [out async for out in agen]

            return call_agen

        def sync_call(item: Any, res: Any) -> Any:
            out = target(item, res) if takes_resource else target(item)
            return list(out) if opts.kind == "syncgen" else out

        if opts.run_in == "task":

            async def call_inline(item: Any, res: Any) -> Any:
                return sync_call(item, res)

            return call_inline

        if opts.run_in == "process":
            from ._process import ProcessPool, process_call

            self.process_pool = ProcessPool(self.name)
            return process_call(target, limiter, self.process_pool)

        c = self.c

        def timed_call(item: Any, res: Any) -> tuple[Any, float]:
            # CPU time of the call in its own thread: how a report tells CPU-bound work
            # (which the GIL serialises) from waiting. Lost if the call raises; fine.
            t = time.thread_time()
            out = sync_call(item, res)
            return out, time.thread_time() - t

        async def call_thread(item: Any, res: Any) -> Any:
            out, cpu = await trio.to_thread.run_sync(
                timed_call, item, res, limiter=limiter, thread_name=thread_name
            )
            c.cpu_time += cpu
            return out

        return call_thread

    def _make_dead_letter(self) -> Callable[[Failed[Any], Ack | None], Awaitable[bool]] | None:
        """The stage's dead-letter sink as ``await sink(failed, ack) -> took_ack``.

        A callable (sync or async) is called in the failing worker; a :class:`Stage`
        runs as a side stage with its own workers, fed through a channel, and takes over
        the item's ack (it acks once it has handled the item).
        """
        if self.index < 0:
            return None  # a dead-letter stage's own failures follow its errors= policy
        sink = self.opts.dead_letter if self.opts.dead_letter is not None else self.run.dead_letter
        if sink is None:
            return None
        if isinstance(sink, Stage):
            run = self.run
            dl_run = run.dead_letter_run(sink)

            async def to_stage(failed: Failed[Any], ack: Ack | None) -> bool:
                # A fail-fast stop elsewhere must not cancel this hand-over, or the item
                # would be lost: it is shielded, and bounded once the run has failed.
                with trio.CancelScope(shield=True) as scope:
                    run.handovers.add(scope)
                    if run.first_failure is not None:
                        scope.deadline = trio.current_time() + _TEARDOWN_LIMIT
                    try:
                        await dl_run.put(failed, ack)
                        return ack is not None
                    except trio.BrokenResourceError:
                        pass  # the dead-letter stage is gone: the run is being cancelled
                    finally:
                        run.handovers.discard(scope)
                await _report_cancellation_first()
                raise trio.BrokenResourceError("the dead-letter stage stopped first")

            return to_stage

        fn = sink

        async def to_callable(failed: Failed[Any], ack: Ack | None) -> bool:
            result = fn(failed)
            if inspect.isawaitable(result):
                await result
            return False

        return to_callable

    async def put(self, item: Any, ack: Ack | None) -> None:
        """Dead-letter stages: take a failed item from another stage's worker."""
        send = self.run.dead_letter_sends[id(self)]
        env = Env(item, self.in_seq, self.run.now(), ack)
        self.in_seq += 1
        await send.send(env)

    def connect(self, nxt: StageRun | None, outlet: Outlet) -> None:
        self.next = nxt
        if nxt is not None:
            self._emit = self._emit_channel
        elif outlet == "collect":
            self._emit = self._emit_collect
        elif outlet == "drop":
            self._emit = self._emit_drop
        else:
            self._emit = self._emit_user

    # -- emitting ---------------------------------------------------------------------------

    async def _emit_channel(self, env: Env, send: trio.MemorySendChannel[Env]) -> None:
        nxt = self.next
        assert nxt is not None
        env.seq = nxt.in_seq
        nxt.in_seq += 1
        env.t = t = self.run.now()
        try:
            send.send_nowait(env)
        except trio.WouldBlock:
            await send.send(env)
            self.c.blocked_time += self.run.now() - t
        except trio.BrokenResourceError:
            await _report_cancellation_first()
            raise

    async def _emit_collect(self, env: Env, send: Any) -> None:
        self.run.outputs.append(env.item)
        if env.ack is not None:
            env.ack.done()

    async def _emit_drop(self, env: Env, send: Any) -> None:
        if env.ack is not None:
            env.ack.done()

    async def _emit_user(self, env: Env, send: trio.MemorySendChannel[Env]) -> None:
        # The reader (Outputs.receive) acks the item when it takes it.
        try:
            send.send_nowait(env)
        except trio.WouldBlock:
            t = self.run.now()
            await send.send(env)
            self.c.blocked_time += self.run.now() - t
        except trio.BrokenResourceError:
            await _report_cancellation_first()
            raise

    async def _deposit(self, seq: int, envs: list[Env], send: Any) -> None:
        """Ordered stages: park outputs until every earlier item has left, then emit.

        Whichever worker completes the head of the line flushes the run of ready results
        behind it; the others go back to work (up to the window's size).
        """
        ready = self._ready
        ready[seq] = envs
        if seq != self._next_out or self._flushing:
            return
        self._flushing = True
        try:
            emit = self._emit
            window = self._window
            assert window is not None
            while self._next_out in ready:
                batch = ready.pop(self._next_out)
                self._next_out += 1
                for env in batch:
                    await emit(env, send)
                window.release()
        finally:
            self._flushing = False

    # -- the worker ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _resource(self) -> AsyncIterator[Any]:
        """A worker's resource, closed on every exit path. The close runs shielded from
        the run's cancellation (a connection is closed properly even when the run is
        cancelled), but for at most ``_TEARDOWN_LIMIT`` seconds."""
        if self.stage._has_worker_hooks:
            res = await self.stage.open_worker()
            try:
                yield res
            finally:
                with _teardown_scope():
                    await self.stage.close_worker(res)
        elif self.opts.resource is not None:
            manager = self.opts.resource()
            res = await manager.__aenter__()
            try:
                yield res
            except BaseException as exc:
                with _teardown_scope():
                    await manager.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            else:
                with _teardown_scope():
                    await manager.__aexit__(None, None, None)
        else:
            yield None

    async def worker(
        self, recv: trio.MemoryReceiveChannel[Env], send: trio.MemorySendChannel[Any] | None
    ) -> None:
        c = self.c
        now = self.run.now
        c.workers += 1
        c.workers_peak = max(c.workers_peak, c.workers)
        c.worker_time -= now()
        try:
            with recv, send if send is not None else contextlib.nullcontext():
                async with self._resource() as res:
                    await self._work(recv, send, res)
        finally:
            c.workers -= 1
            c.worker_time += now()
            if c.workers == 0:
                self._workers_gone.set()
                if self is self.run.stages[-1]:
                    # Every item has left the main stages: no more dead letters.
                    self.run.close_dead_letters()

    async def _work(self, recv: trio.MemoryReceiveChannel[Env], send: Any, res: Any) -> None:
        c = self.c
        now = self.run.now
        emit = self._emit
        simple = self._simple
        call = self._call if simple else self._call_with_policies
        task = trio.lowlevel.current_task()
        multi = self.multi
        ordered = self.ordered
        window = self._window if self._workers_take_window else None
        batched = self.batched
        keyed = self.keyed
        autoscale = self.opts.autoscale
        min_workers = self.opts.min_workers
        passthrough = self.index >= 0  # a dead-letter stage's input *is* Failed values
        spins = 0
        while True:
            if autoscale and self._retire and c.workers > min_workers:
                self._retire -= 1
                return
            if window is not None:
                await _take_slot(window)
            try:
                env = recv.receive_nowait()
            except trio.WouldBlock:
                try:
                    if autoscale:
                        got = await self._receive_or_retire(recv)
                        if got is None:
                            if window is not None:
                                window.release()
                            return
                        env = got
                    else:
                        env = await recv.receive()
                except trio.EndOfChannel:
                    break
                spins = 0
            except trio.EndOfChannel:
                break
            else:
                spins += 1
                if spins >= _SPIN_LIMIT:
                    spins = 0
                    await trio.lowlevel.checkpoint()

            item = env.item
            if type(item) is Failed and passthrough:
                # An upstream failure travelling as a value: pass it on untouched.
                c.passed += 1
                if ordered:
                    await self._deposit(env.seq, [env], send)
                else:
                    await emit(env, send)
                continue
            if keyed and type(item) is _KeyFailed:
                env.item = item.item
                c.items_in += 1
                c.inflight += 1
                await self._on_failure(env, item.error, 1, send)
                continue

            w = len(item) if batched else 1  # a batch counts as its items
            c.items_in += w
            c.inflight += w
            t0 = now()
            c.waits.observe(t0 - env.t)
            c.busy_workers += 1
            error: Exception | None = None
            try:
                result = await call(item, res)
            except Exception as exc:
                error = exc
            finally:
                c.busy_workers -= 1
            d = now() - t0
            if not simple:
                # Time spent waiting for a rate-limit token or a held breaker is not
                # work: it must not make the stage look busy (or name it the bottleneck).
                d -= self._throttled.pop(task, 0.0)
            c.busy_time += d
            c.durations.observe(d)
            if error is not None:
                if isinstance(error, _GaveUp):
                    await self._on_failure(env, error.error, error.attempts, send, w)
                else:
                    await self._on_failure(env, error, 1, send, w)
                continue

            if not multi:
                c.ok += w
                c.items_out += 1
                c.inflight -= w
                env.item = result
                if ordered:
                    await self._deposit(env.seq, [env], send)
                else:
                    await emit(env, send)
            else:
                n = len(result)
                if n == 0:
                    c.filtered += w
                    c.inflight -= w
                    if env.ack is not None:
                        env.ack.done()
                    if ordered:
                        await self._deposit(env.seq, [], send)
                else:
                    c.ok += w
                    c.items_out += n
                    c.inflight -= w
                    ack = env.ack
                    if ack is not None and n > 1:
                        ack.add(n - 1)
                    env.item = result[0]
                    envs = [env]
                    envs.extend(Env(out, 0, 0.0, ack) for out in result[1:])
                    if ordered:
                        await self._deposit(env.seq, envs, send)
                    else:
                        for e in envs:
                            await emit(e, send)

    async def _receive_or_retire(self, recv: trio.MemoryReceiveChannel[Env]) -> Env | None:
        """Autoscaled stages: wait for an item; after a long idle spell, retire (None)."""
        c = self.c
        while True:
            with trio.move_on_after(_IDLE_RETIRE):
                return await recv.receive()
            if c.workers > self.opts.min_workers:
                self.run.log.info(
                    "workers_scaled",
                    stage=self.name,
                    old=c.workers,
                    new=c.workers - 1,
                    reason=f"worker idle for {_IDLE_RETIRE:g}s",
                )
                return None

    def _load(self) -> float:
        """How full the input queue is, 0..1; 1 when senders are waiting on it."""
        if self.recv is None:
            return 0.0
        st = self.recv.statistics()
        if st.tasks_waiting_send:
            return 1.0
        cap = self.opts.buffer_size
        return st.current_buffer_used / cap if cap else 0.0

    async def _supervise(
        self, nursery: trio.Nursery, recv: trio.MemoryReceiveChannel[Env], send: Any
    ) -> None:
        """Autoscaling: grow at the high watermark, shrink at the low one after a
        cool-down (hysteresis), never below min or above max; every decision logged."""
        c = self.c
        opts = self.opts
        now = self.run.now
        last_change = now()
        with recv, send if send is not None else contextlib.nullcontext():
            while True:
                with trio.move_on_after(_SCALE_INTERVAL):
                    await self._workers_gone.wait()
                if self._workers_gone.is_set():
                    return
                load = self._load()
                n = c.workers - self._retire
                if load >= _GROW_AT and n < opts.max_workers:
                    add = min(opts.max_workers - n, max(1, n // 2))
                    for _ in range(add):
                        nursery.start_soon(
                            self.worker,
                            recv.clone(),
                            send.clone() if send is not None else None,
                            name=f"pipeflow:{self.run.pipeline}:{self.name}",
                        )
                    self.run.log.info(
                        "workers_scaled",
                        stage=self.name,
                        old=n,
                        new=n + add,
                        reason=f"queue {load:.0%} full",
                    )
                    last_change = now()
                elif (
                    load <= _SHRINK_AT
                    and n > opts.min_workers
                    and now() - last_change >= _SHRINK_COOLDOWN
                    and c.busy_workers < n
                ):
                    self._retire += 1
                    self.run.log.info(
                        "workers_scaled",
                        stage=self.name,
                        old=n,
                        new=n - 1,
                        reason=f"queue {load:.0%} full",
                    )
                    last_change = now()

    async def _batcher(
        self, recv: trio.MemoryReceiveChannel[Env], send: trio.MemorySendChannel[Env]
    ) -> None:
        """``batch=N, batch_timeout=T``: lists of up to N items, a partial one flushed T
        seconds after its first item arrived, or at the end of the stream."""
        size = self.opts.batch
        assert size is not None
        timeout = self.opts.batch_timeout
        now = self.run.now
        seq = 0
        buf: list[Env] = []
        deadline = math.inf

        async def flush() -> None:
            nonlocal seq, buf, deadline
            acks: list[Ack] = [e.ack for e in buf if e.ack is not None]
            batch = Env([e.item for e in buf], seq, buf[0].t, _BatchAck(acks) if acks else None)
            seq += 1
            buf = []
            deadline = math.inf
            await send.send(batch)

        with recv, send:
            while True:
                try:
                    if buf and timeout is not None:
                        got: Env | None = None
                        with trio.move_on_at(deadline):
                            got = await recv.receive()
                        if got is None:
                            await flush()
                            continue
                        env = got
                    else:
                        env = await recv.receive()
                except trio.EndOfChannel:
                    break
                if type(env.item) is Failed and self.index >= 0:
                    # Failures from upstream pass a main stage unbatched; a dead-letter
                    # stage's input is all Failed values, and those it batches.
                    env.seq = seq
                    seq += 1
                    await send.send(env)
                    continue
                if not buf and timeout is not None:
                    deadline = now() + timeout
                buf.append(env)
                if len(buf) >= size:
                    await flush()
            if buf:
                await flush()

    async def _dispatch(
        self,
        recv: trio.MemoryReceiveChannel[Env],
        sends: list[trio.MemorySendChannel[Env]],
    ) -> None:
        """``key=``: route each item to worker ``stable_hash(key) % N``, so one key is
        handled by one worker, one item at a time, in input order."""
        key = self.opts.key
        assert key is not None
        n = len(sends)
        window = self._window
        with recv, contextlib.ExitStack() as stack:
            for s in sends:
                stack.enter_context(s)
            while True:
                if window is not None:
                    await _take_slot(window)
                try:
                    env = await recv.receive()
                except trio.EndOfChannel:
                    break
                item = env.item
                if type(item) is Failed:
                    index = env.seq % n
                else:
                    try:
                        index = stable_hash(key(item)) % n
                    except Exception as exc:
                        env.item = _KeyFailed(item, exc)
                        index = env.seq % n
                out = sends[index]
                try:
                    out.send_nowait(env)
                except trio.WouldBlock:
                    await out.send(env)

    def launch(
        self,
        nursery: trio.Nursery,
        recv: trio.MemoryReceiveChannel[Env],
        send: trio.MemorySendChannel[Any] | None,
    ) -> None:
        """Start this stage's tasks; takes ownership of ``recv`` and ``send``."""
        self.recv = recv
        if self.process_pool is None:
            self._launch(nursery, recv, send)
        else:
            nursery.start_soon(
                self._launch_with_processes,
                nursery,
                recv,
                send,
                name=f"pipeflow:{self.run.pipeline}:{self.name}:processes",
            )

    async def _launch_with_processes(
        self,
        nursery: trio.Nursery,
        recv: trio.MemoryReceiveChannel[Env],
        send: trio.MemorySendChannel[Any] | None,
    ) -> None:
        """Process stages: the worker processes live exactly as long as the workers."""
        with recv, send if send is not None else contextlib.nullcontext():
            async with self.process_pool.open():
                self._launch(nursery, recv.clone(), send.clone() if send is not None else None)
                await self._workers_gone.wait()

    def _launch(
        self,
        nursery: trio.Nursery,
        recv: trio.MemoryReceiveChannel[Env],
        send: trio.MemorySendChannel[Any] | None,
    ) -> None:
        name = f"pipeflow:{self.run.pipeline}:{self.name}"
        opts = self.opts
        if opts.batch is not None:
            batch_send, batch_recv = trio.open_memory_channel[Env](0)
            nursery.start_soon(self._batcher, recv, batch_send, name=f"{name}:batcher")
            recv = batch_recv
        with send if send is not None else contextlib.nullcontext():
            if opts.key is not None:
                per_worker = max(1, math.ceil(opts.buffer_size / opts.max_workers))
                channels = [
                    trio.open_memory_channel[Env](per_worker) for _ in range(opts.max_workers)
                ]
                nursery.start_soon(
                    self._dispatch, recv, [s for s, _ in channels], name=f"{name}:router"
                )
                for _, worker_recv in channels:
                    nursery.start_soon(
                        self.worker,
                        worker_recv,
                        send.clone() if send is not None else None,
                        name=name,
                    )
                return
            with recv:
                for _ in range(opts.min_workers):
                    nursery.start_soon(
                        self.worker,
                        recv.clone(),
                        send.clone() if send is not None else None,
                        name=name,
                    )
                if opts.autoscale:
                    nursery.start_soon(
                        self._supervise,
                        nursery,
                        recv.clone(),
                        send.clone() if send is not None else None,
                        name=f"{name}:autoscale",
                    )

    async def _call_with_policies(self, item: Any, res: Any) -> Any:
        """One item through rate limit, breaker, timeout and retries."""
        opts = self.opts
        call = self._call
        retry = opts.retries
        timeout = opts.timeout
        bucket = self._bucket
        breaker = self._breaker
        attempt = 0
        last_error: Exception | None = None
        while True:
            attempt += 1
            probe = False
            try:
                if breaker is not None or bucket is not None:
                    waited_from = self.run.now()
                    if breaker is not None:
                        probe = await breaker.admit()
                    if bucket is not None:
                        await bucket.acquire()
                    waited = self.run.now() - waited_from
                    if waited:
                        self.c.throttled_time += waited
                        task = trio.lowlevel.current_task()
                        self._throttled[task] = self._throttled.get(task, 0.0) + waited
                if timeout is not None and self.process_pool is not None:
                    await self.process_pool.warm()
                if timeout is None:
                    result = await call(item, res)
                else:
                    with trio.move_on_after(timeout) as scope:
                        result = await call(item, res)
                    # cancel_called, not cancelled_caught: a worker thread cannot be
                    # interrupted, so its call returns normally after the deadline.
                    if scope.cancel_called:
                        raise TimeoutError(f"stage {self.name!r} timed out after {timeout:g}s")
            except Exception as exc:
                if breaker is not None and not isinstance(exc, CircuitOpen):
                    breaker.record(False, probe)
                if isinstance(exc, CircuitOpen) and last_error is not None:
                    # A retry refused by the breaker: keep what made the item fail.
                    exc.__cause__ = last_error
                last_error = exc
                if (
                    retry is not None
                    and attempt <= retry.attempts
                    and retry.retryable(exc)
                    and not isinstance(exc, CircuitOpen)
                ):
                    self.c.retried += 1
                    delay = retry.delay(attempt, self._rng)
                    self.run.log.info(
                        "item_retried",
                        stage=self.name,
                        item=short_repr(item),
                        attempt=attempt,
                        error=repr(exc),
                        delay=delay,
                    )
                    await trio.sleep(delay)
                    continue
                raise _GaveUp(exc, attempt) from exc
            except BaseException:
                if probe and breaker is not None:
                    breaker.release_probe()
                raise
            if breaker is not None:
                breaker.record(True, probe)
            return result

    async def _on_failure(
        self, env: Env, error: Exception, attempts: int, send: Any, weight: int = 1
    ) -> None:
        c = self.c
        c.failed += weight
        item = env.item
        policy = self.opts.errors
        failed = Failed(item, error, self.name, attempts=attempts)
        log = self.run.log
        (log.error if policy == "fail_fast" else log.warning)(
            "stage_failed",
            stage=self.name,
            item=short_repr(item),
            error=repr(error),
            attempts=attempts,
            policy=policy,
        )
        ack_taken = False
        if self._dead_letter is not None:
            # The item ends here under collect/skip: the dead-letter sink acks it.
            handover = env.ack if policy in ("collect", "skip") else None
            try:
                ack_taken = await self._dead_letter(failed, handover)
            except Exception as sink_error:
                c.inflight -= weight
                err = StageError(f"{self.name}.dead_letter", failed, sink_error)
                self.run.fail(err)
                raise err from sink_error
        c.inflight -= weight
        if policy == "fail_fast":
            err = StageError(self.name, item, error, attempts=attempts)
            self.run.fail(err)
            raise err
        if policy == "embed":
            env.item = failed
            if self.ordered:
                await self._deposit(env.seq, [env], send)
            else:
                await self._emit(env, send)
            return
        if policy == "collect":
            self.run.errors.append(StageError(self.name, item, error, attempts=attempts))
        if env.ack is not None and not ack_taken:
            env.ack.done()
        self._check_budget(item, error, attempts, weight)
        if self.ordered:
            await self._deposit(env.seq, [], send)

    def _check_budget(self, item: Any, error: Exception, attempts: int, weight: int) -> None:
        run = self.run
        run.failures += weight
        if run.max_failures is not None and run.failures > run.max_failures:
            err = TooManyFailures(self.name, item, error, attempts=attempts)
            err.add_note(
                f"pipeline {run.pipeline!r}: {run.failures} items failed, over its error "
                f"budget max_failures={run.max_failures!r}"
            )
            run.log.error(
                "error_budget_exceeded",
                stage=self.name,
                failed=run.failures,
                max_failures=run.max_failures,
                scope="pipeline",
            )
            run.fail(err)
            raise err
        limit = self.opts.max_failures
        if limit is None:
            return
        c = self.c
        if isinstance(limit, int):
            over = c.failed > limit
        else:
            # A fraction needs a sample before it means anything.
            over = c.items_in >= math.ceil(10 / limit) and c.failed > limit * c.items_in
        if over:
            err = TooManyFailures(self.name, item, error, attempts=attempts)
            err.add_note(
                f"stage {self.name!r}: {c.failed} of {c.items_in} items failed, "
                f"over its error budget max_failures={limit!r}"
            )
            self.run.log.error(
                "error_budget_exceeded",
                stage=self.name,
                failed=c.failed,
                items_in=c.items_in,
                max_failures=limit,
                scope="stage",
            )
            self.run.fail(err)
            raise err

    def finish_budget(self) -> None:
        """At the end of a run, a fractional budget is checked on the whole stream."""
        limit = self.opts.max_failures
        c = self.c
        if isinstance(limit, float) and c.items_in and c.failed > limit * c.items_in:
            summary = f"{c.failed} of {c.items_in} items failed"
            err = TooManyFailures(
                self.name,
                None,
                RuntimeError(summary),
                message=f"stage {self.name!r}: {summary}, over its error budget "
                f"max_failures={limit!r}",
            )
            err.add_note(f"stage {self.name!r}: over its error budget max_failures={limit!r}")
            self.run.fail(err)
            raise err

    def stats(self, now: float, elapsed: float, *, final: bool = False) -> StageStats:
        depth = 0
        if self.recv is not None:
            depth = self.recv.statistics().current_buffer_used
        state = self._breaker.state if self._breaker is not None else None
        return self.c.snapshot(now, elapsed, queue_depth=depth, breaker_state=state, final=final)


class Run:
    """One execution of a pipeline: its stages, channels, outputs and failures."""

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
        self.first_failure: BaseException | None = None
        self.t_start = 0.0
        self.t_end: float | None = None
        self._breakers: dict[int, BreakerRuntime] = {}
        self.dead_letter_runs: list[StageRun] = []
        self.dead_letter_sends: dict[int, trio.MemorySendChannel[Env]] = {}
        self._dead_letter_recvs: dict[int, trio.MemoryReceiveChannel[Env]] = {}
        self.dead_letter_scope = trio.CancelScope()
        self.handovers: set[trio.CancelScope] = set()  # items on their way to dead letters
        self.dead_letter_nursery: trio.Nursery | None = None
        self.started = False
        self.stages = [StageRun(self, s, i) for i, s in enumerate(stages)]
        for a, b in zip(self.stages, [*self.stages[1:], None], strict=True):
            a.connect(b, outlet)
        self._outlet_buffer = outlet_buffer
        self.entry: trio.MemorySendChannel[Env] | None = None
        self.out_recv: trio.MemoryReceiveChannel[Any] | None = None
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

    def dead_letter_run(self, stage: Stage[Any, Any]) -> StageRun:
        """The side stage for a dead-letter :class:`Stage` (one per stage object)."""
        for dl in self.dead_letter_runs:
            if dl.stage is stage:
                return dl
        dl = StageRun(self, stage, -1)
        dl.connect(None, "drop")
        send, recv = trio.open_memory_channel[Env](stage.options.buffer_size)
        self.dead_letter_sends[id(dl)] = send
        self._dead_letter_recvs[id(dl)] = recv
        self.dead_letter_runs.append(dl)
        return dl

    def start_dead_letters(self, nursery: trio.Nursery) -> None:
        for dl in self.dead_letter_runs:
            dl.launch(nursery, self._dead_letter_recvs.pop(id(dl)), None)

    def close_dead_letters(self) -> None:
        for send in self.dead_letter_sends.values():
            send.close()

    async def wait_drained(self) -> None:
        """Until every item has left the pipeline (main stages, then dead letters)."""
        await self.stages[-1]._workers_gone.wait()
        for dl in self.dead_letter_runs:
            await dl._workers_gone.wait()

    def fail(self, error: BaseException) -> None:
        if self.first_failure is None:
            self.first_failure = error
            self.pump_scope.cancel()  # take no more input
            # Hand-overs to dead-letter stages may finish, but not for ever.
            deadline = trio.current_time() + _TEARDOWN_LIMIT
            for scope in self.handovers:
                scope.deadline = min(scope.deadline, deadline)

    # -- wiring ------------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Open the channels and start every worker. ``self.entry`` is the input side."""
        clock = trio.lowlevel.current_clock()
        self.now = clock.current_time
        self.t_start = self.now()
        self.started = True
        self.log.info("run_started", stages=[s.name for s in self.stages])
        first_send, recv = trio.open_memory_channel[Env](self.stages[0].opts.buffer_size)
        self.entry = first_send
        for i, sr in enumerate(self.stages):
            send: trio.MemorySendChannel[Any] | None
            if i + 1 < len(self.stages):
                send, next_recv = trio.open_memory_channel[Env](self.stages[i + 1].opts.buffer_size)
            elif self.outlet == "channel":
                send, next_recv = trio.open_memory_channel[Any](self._outlet_buffer)
                self.out_recv = next_recv
            else:
                send, next_recv = None, None
            sr.launch(nursery, recv, send)
            recv = next_recv  # type: ignore[assignment]

    def stop_input(self, grace: float | None) -> None:
        """Stop taking input; the items already in finish, for at most ``grace`` seconds.

        The source's task closes the first channel as it leaves (starting the cascade);
        closing it here instead would race with a send it is about to make.
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

    async def pump(self, source: Iterable[Any] | Any) -> None:
        """Feed the source into the first stage, then close it (starting the cascade)."""
        if hasattr(source, "__pipeflow_open__"):
            # An acking source (Redis Streams): items come with an Ack each, and the
            # source never holds more un-acked items than the run can hold. It stays open
            # after its input ends (or is stopped by a signal) until every item in flight
            # has left the pipeline, so that it can ack them.
            try:
                async with source.__pipeflow_open__(capacity=self.capacity()) as entries:
                    with self.pump_scope:
                        try:
                            await self._pump(entries, acking=True)
                        except trio.BrokenResourceError:
                            if self.first_failure is None:
                                raise
                            # The main stages stopped on a failure: read no more, but
                            # stay open so dead-letter stages can ack what they took.
                    await self.wait_drained()
                    if self.first_failure is not None:
                        # Tell the source the run failed: some items will never be
                        # acked, so it must not wait for them (it releases them).
                        raise _RunFailed
            except _RunFailed:
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
        if hasattr(source, "__pipeflow_open__") and self.dead_letter_nursery is not None:
            nursery = self.dead_letter_nursery
        nursery.start_soon(self.pump, source, name=f"pipeflow:{self.pipeline}:source")

    async def _pump(self, source: Iterable[Any] | Any, *, acking: bool = False) -> None:
        assert self.entry is not None
        first = self.stages[0]
        now = self.now
        send = self.entry
        try:
            with send:
                if acking:
                    entries = cast(AsyncIterator[tuple[Any, Ack | None]], source)
                    async for item, ack in entries:
                        env = Env(item, first.in_seq, now(), ack)
                        first.in_seq += 1
                        try:
                            send.send_nowait(env)
                        except trio.WouldBlock:
                            await send.send(env)
                elif hasattr(source, "__aiter__"):
                    aiter_ = source.__aiter__()
                    owns = hasattr(aiter_, "aclose") and not isinstance(
                        source, trio.abc.ReceiveChannel
                    )
                    async with contextlib.aclosing(aiter_) if owns else contextlib.nullcontext():
                        async for item in aiter_:
                            env = Env(item, first.in_seq, now(), None)
                            first.in_seq += 1
                            try:
                                send.send_nowait(env)
                            except trio.WouldBlock:
                                await send.send(env)
                else:
                    spins = 0
                    for item in source:
                        env = Env(item, first.in_seq, now(), None)
                        first.in_seq += 1
                        try:
                            send.send_nowait(env)
                        except trio.WouldBlock:
                            await send.send(env)
                            spins = 0
                        else:
                            spins += 1
                            if spins >= _SPIN_LIMIT:
                                spins = 0
                                await trio.lowlevel.checkpoint()
        except trio.BrokenResourceError:
            await _report_cancellation_first()
            raise
        except Exception as exc:
            self.fail(exc)
            raise

    def capacity(self) -> int:
        """How many items this run can hold at once: in workers, buffers and windows."""
        total = 0
        batches = 1
        for sr in self.stages:
            o = sr.opts
            total += o.max_workers + o.buffer_size
            total += sr.window_size
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
        leaves = list(_leaves(group))
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if any(not isinstance(e, Exception) for e in real):
            return None
        first = self.first_failure
        if first is not None and any(e is first for e in real):
            others = [e for e in real if e is not first]
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


#: How long a worker's resource may take to close once the run is cancelled.
_TEARDOWN_LIMIT = 10.0


def _teardown_scope() -> trio.CancelScope:
    return trio.CancelScope(shield=True, deadline=trio.current_time() + _TEARDOWN_LIMIT)


async def _take_slot(window: trio.Semaphore) -> None:
    """Take a reorder-window slot, without a scheduler round when one is free."""
    try:
        window.acquire_nowait()
    except trio.WouldBlock:
        await window.acquire()


async def _report_cancellation_first() -> None:
    """A channel broke because the run is stopping (its readers were cancelled, or the
    consumer left): checkpoint so the cancellation, not the broken channel, is raised."""
    await trio.lowlevel.checkpoint()


def signal_service(run: Run, grace: float) -> Service:
    """SIGINT / SIGTERM: the first stops the input and lets in-flight items finish within
    ``grace`` seconds, then cancels; a second cancels at once."""

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if run.interrupted_by is None:
                    run.interrupted_by = signum
                    run.log.warning("signal_received", signal=name, action="drain", grace=grace)
                    run.stop_input(grace)
                else:
                    run.log.warning("signal_received", signal=name, action="cancel")
                    run.cancel()

    return watch_signals


def _leaves(group: BaseExceptionGroup[Any]) -> Iterable[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


#: A service runs beside a pipeline for exactly its lifetime (a metrics endpoint):
#: started with ``nursery.start`` before the first item, cancelled after the last.
Service = Callable[..., Awaitable[None]]


@contextlib.asynccontextmanager
async def running(run: Run, services: Sequence[Service] = ()) -> AsyncIterator[trio.Nursery]:
    """Start ``run`` in a nursery of its own; on exit, wait for it and raise its failure.

    The body runs inside the run's cancel scope: a fail-fast error cancels it too.
    """
    failure: BaseException | None = None
    try:
        # Three nested lifetimes: services (a metrics endpoint) outlive the dead-letter
        # stages, which outlive the main stages, so failed items still reach their sink
        # when a fail-fast error stops the main stages.
        async with trio.open_nursery() as service_nursery:
            for service in services:
                await service_nursery.start(service)
            try:
                stopped: BaseException | None = None
                with run.dead_letter_scope:
                    async with trio.open_nursery() as dead_letter_nursery:
                        run.dead_letter_nursery = dead_letter_nursery
                        run.start_dead_letters(dead_letter_nursery)
                        try:
                            async with trio.open_nursery() as nursery:
                                run.cancel_scope = nursery.cancel_scope
                                run.start(nursery)
                                yield nursery
                        except BaseException as exc:
                            # Held until the dead-letter stages have taken what they
                            # were given: raised here, it would cancel them at once.
                            stopped = exc
                        finally:
                            run.close_dead_letters()
                if stopped is not None:
                    raise stopped
                # Every stage has drained: end-of-stream checks (fractional error budgets).
                for sr in run.stages:
                    sr.finish_budget()
            finally:
                service_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = run.primary_error(group)
        if failure is None:
            raise
    finally:
        if run.started:
            run.t_end = run.now()
            counts = {
                sr.name: {
                    "items_in": sr.c.items_in,
                    "items_out": sr.c.items_out,
                    "failed": sr.c.failed,
                }
                for sr in run.stages
            }
            run.log.info(
                "run_finished",
                elapsed=run.t_end - run.t_start,
                failed=run.first_failure is not None,
                counts=counts,
            )
    if failure is not None:
        raise failure
