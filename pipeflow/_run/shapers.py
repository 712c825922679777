"""Shapers: what a stage does to the flow of items besides calling the function.

Each is its own task or object, so that the worker loop does not change when a new one
comes: batching (:func:`batcher`), key routing (:func:`router`), reordering
(:class:`Reorder`), autoscaling (:func:`supervise`, :func:`take_or_retire`).
"""

from __future__ import annotations

import math
import operator
import zlib
from typing import TYPE_CHECKING

import trio

from .._errors import Failed
from .edge import CHUNK, Edge
from .envelope import CountedAck, Env, KeyFailed

if TYPE_CHECKING:
    from .worker import Outbox, StageRun

#: The reorder window of an ordered stage, in items per worker (at least _MIN_WINDOW).
WINDOW_PER_WORKER = 4
MIN_WINDOW = 64  # two chunks: a worker can take a chunk while the last one flushes

# Autoscaling (workers=(min, max)): a watermark supervisor with hysteresis.
SCALE_INTERVAL = 1.0  # seconds between decisions
GROW_AT = 0.8  # input queue this full (or upstream blocked): grow by half, at least 1
SHRINK_AT = 0.2  # input queue this empty, and no change for a cooldown: retire one
SHRINK_COOLDOWN = 5.0
IDLE_RETIRE = 30.0  # a worker idle this long retires (never below min)

# The batcher's per-item passes, done in C (map) rather than in Python loops.
_item_of = operator.attrgetter("item")
_ack_of = operator.attrgetter("ack")


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


# -- ordering ------------------------------------------------------------------------------


def order_once(stages: list[StageRun]) -> None:
    """Where ordered stages follow one another, restore the order once, after the last.

    In a run of ordered stages (each a plain map: no key, batch or generator), the first
    takes a slot of one shared window for each item, the items keep the positions the
    first stage's input gave them through the stages after it, and only the last puts
    the outputs back in order. A failure that leaves no output before the last stage is
    a hole the last one is told of. Every stage after the first needs more than one
    worker: a stage with one worker calls its items in the order they arrive, and that
    order stays the input order.
    """

    def joins(sr: StageRun) -> bool:
        return sr.opts.ordered and not (sr.keyed or sr.batched or sr.multi)

    start = 0
    while start < len(stages):
        end = start
        if joins(stages[start]):
            while (
                end + 1 < len(stages)
                and joins(stages[end + 1])
                and stages[end + 1].opts.max_workers > 1
            ):
                end += 1
        if end > start:
            group = stages[start : end + 1]
            workers = sum(sr.opts.max_workers for sr in group)
            between = sum(sr.opts.buffer_size for sr in group[1:])
            window = Reorder(workers, group[-1], extra=between)
            for sr in group:
                sr.reorder = sr.window = None
                sr.holes = window
            group[0].window = window
            last = group[-1]
            last.reorder = window
            last.holes = None
            for sr in group[1:]:
                sr.inbox.numbered = False  # the positions the first stage's input gave
        start = end + 1


_NOT_READY: list[Env] = []  # a position whose outputs are not in yet (compared by identity)


def _runs_from(results: list[tuple[int, list[Env]]], position: int) -> bool:
    """Whether ``results`` hold exactly the positions ``position``, ``position + 1``, ...
    in that order."""
    for seq, _ in results:
        if seq != position:
            return False
        position += 1
    return True


class Reorder:
    """``ordered=True``: outputs leave in input order, at most a window ahead.

    A worker reserves window slots before it takes items (:meth:`reserve`), so that the
    head of the line always has a slot; whichever worker completes the head flushes the
    run of ready results behind it in one hand-off (:meth:`deposit`).
    """

    def __init__(self, workers: int, sr: StageRun, *, extra: int = 0) -> None:
        self.size = max(MIN_WINDOW, WINDOW_PER_WORKER * workers + extra)
        self.free = self.size  # window slots not held by an item
        self._waiting = trio.lowlevel.ParkingLot()
        self.ready: dict[int, list[Env]] = {}
        self.next = 0
        self.flushing = False
        self.out: Outbox = sr.out

    async def reserve(self, limit: int) -> int:
        """Take one slot (waiting if needed), and up to ``limit`` in all if free now."""
        while not self.free:
            await self._waiting.park()
        got = min(limit, self.free)
        self.free -= got
        if self.free and self._waiting:
            self._waiting.unpark()  # slots are left: the next waiter's turn
        return got

    def release(self, n: int) -> None:
        if n:
            self.free += n
            if self._waiting:
                self._waiting.unpark()

    async def take_slot(self) -> None:
        await self.reserve(1)

    async def deposit(self, results: list[tuple[int, list[Env]]]) -> float:
        """Park outputs by input position; emit every run that is complete, in order.
        Returns the seconds spent blocked handing them on."""
        ready = self.ready
        nxt = self.next
        if not self.flushing and not ready and results and _runs_from(results, nxt):
            # The usual case: this chunk is the head of the line and nothing waits
            # behind it (one run of positions, taken from the edge in order). Checked
            # position by position: the last stage of an order-once group takes its items
            # in the order the stage before it finished them, so a chunk can start at the
            # head and span the right positions yet be shuffled inside.
            out = [env for _, envs in results for env in envs]
            n = len(results)
            nxt += n
        else:
            for seq, envs in results:
                ready[seq] = envs
            if self.flushing or nxt not in ready:
                return 0.0
            out = []
            n = 0
        self.flushing = True
        blocked = 0.0
        pop = ready.pop
        try:
            while True:
                while True:
                    envs = pop(nxt, _NOT_READY)
                    if envs is _NOT_READY:
                        break
                    out.extend(envs)
                    nxt += 1
                    n += 1
                if not n:
                    break
                self.next = nxt
                # In order now, so out of the window: workers may go on while this
                # worker hands the run on (the window bounds the items waiting for
                # their turn; the run in hand is bounded by the window too).
                self.release(n)
                if out:
                    blocked += await self.out.put(out)
                # Others deposited meanwhile: the next run may be complete now.
                out = []
                n = 0
        finally:
            self.flushing = False
        return blocked

    def keep(self, results: list[tuple[int, list[Env]]]) -> None:
        """Results a stop cut before their :meth:`deposit`: held with the others, for
        :meth:`leftovers` (nothing is handed on after a stop)."""
        for seq, envs in results:
            self.ready[seq] = envs

    def leftovers(self) -> list[Env]:
        """What a stop left waiting for an earlier item, in order."""
        ready = self.ready
        out = [env for seq in sorted(ready) for env in ready[seq]]
        ready.clear()
        return out


# -- batching ------------------------------------------------------------------------------


async def batcher(sr: StageRun, inbox: Edge, out: Edge) -> None:
    """``batch=N, batch_timeout=T``: lists of up to N items, a partial one flushed T
    seconds after its first item arrived, or at the end of the stream."""
    size = sr.opts.batch
    assert size is not None
    timeout = sr.opts.batch_timeout
    now = sr.run.now
    seq = 0
    buf: list[Env] = []
    taken: list[Env] = []
    done = 0
    deadline = math.inf

    async def flush() -> None:
        nonlocal seq, buf, deadline
        acks = list(map(_ack_of, buf))
        if None in acks:  # (an identity check first: acks compare by identity)
            acks = [a for a in acks if a is not None]
        batch = Env(list(map(_item_of, buf)), CountedAck(acks) if acks else None)
        batch.seq = seq
        batch.t = buf[0].t
        seq += 1
        buf = []
        deadline = math.inf
        await out.put([batch])

    try:
        while True:
            # Up to what the batch still needs (the rest wait on the edge, where a stop
            # counts them), without a cancel scope while items are waiting.
            want = size - len(buf)
            try:
                envs = inbox.take_ready(want)
                if not envs:
                    if buf and timeout is not None:
                        got: list[Env] | None = None
                        with trio.move_on_at(deadline):
                            got = await inbox.take(want)
                        if got is None:
                            await flush()
                            continue
                        envs = got
                    else:
                        envs = await inbox.take(want)
            except trio.EndOfChannel:
                break
            if sr.is_dead_letter or Failed not in map(type, map(_item_of, envs)):
                # The usual case: the items join the batch in one step.
                if not buf and timeout is not None:
                    deadline = now() + timeout
                buf.extend(envs)
                if len(buf) >= size:
                    await flush()
                continue
            taken = envs
            for pos, env in enumerate(envs, 1):
                done = pos  # taken[done:] is what a stop during a flush below strands
                if type(env.item) is Failed:
                    # Failures from upstream pass a main stage unbatched; a dead-letter
                    # stage's input is all Failed values, and those it batches.
                    env.seq = seq
                    seq += 1
                    await out.put([env])
                    continue
                if not buf and timeout is not None:
                    deadline = now() + timeout
                buf.append(env)
                if len(buf) >= size:
                    await flush()
            taken = []
        if buf:
            await flush()
    except BaseException:
        # Items gathered for a batch, or taken for one, that a stop cut short: still in
        # front of the stage.
        inbox.stranded.extend(buf)
        inbox.stranded.extend(taken[done:])
        raise
    finally:
        inbox.receiver_done()
        out.sender_done()


# -- key routing ---------------------------------------------------------------------------


async def router(sr: StageRun, inbox: Edge, outs: list[Edge]) -> None:
    """``key=``: route each item to worker ``stable_hash(key) % N``, so one key is
    handled by one worker, one item at a time, in input order."""
    key = sr.opts.key
    assert key is not None
    n = len(outs)
    reorder = sr.reorder
    try:
        while True:
            if reorder is not None:
                # Slots are taken here, in input order, one per item.
                await reorder.take_slot()
            try:
                try:
                    envs = inbox.take_nowait(1 if reorder is not None else CHUNK)
                except trio.WouldBlock:
                    envs = await inbox.take(1 if reorder is not None else CHUNK)
            except trio.EndOfChannel:
                break
            except BaseException:
                if reorder is not None:
                    reorder.release(1)
                raise
            groups: dict[int, list[Env]] = {}
            for env in envs:
                item = env.item
                if type(item) is Failed:
                    index = env.seq % n
                else:
                    try:
                        index = stable_hash(key(item)) % n
                    except Exception as exc:
                        env.item = KeyFailed(item, exc)
                        index = env.seq % n
                groups.setdefault(index, []).append(env)
            pending = list(groups.items())
            sent = 0
            try:
                for index, group in pending:
                    # A worker that is gone (the run is stopping) strands its items on
                    # its edge, where the stop's accounting finds them.
                    sent += 1
                    await outs[index].put(group)
            except BaseException:
                for index, group in pending[sent:]:
                    outs[index].stranded.extend(group)
                raise
    finally:
        inbox.receiver_done()
        for edge in outs:
            edge.sender_done()


# -- autoscaling ---------------------------------------------------------------------------


async def take_or_retire(sr: StageRun, inbox: Edge, limit: int) -> list[Env] | None:
    """Autoscaled stages: wait for items; retire (None) when the supervisor asks for one
    worker fewer (it wakes an idle one for that: :func:`supervise`), or after a long
    idle spell."""
    c = sr.c
    while True:
        with trio.move_on_after(IDLE_RETIRE) as waiting:
            sr.idle.add(waiting)
            try:
                return await inbox.take(limit)
            finally:
                sr.idle.discard(waiting)
        if len(inbox):
            # Items came as its wait ended (the supervisor woke it to retire, or its idle
            # spell ran out): the hand-over woke no waiting worker for them, counting on
            # this one, still a receiver, to come back. It takes them; a retirement asked
            # for is carried out after them (see StageRun._work).
            continue
        if sr.retire:
            # The supervisor's decision, already logged: this idle worker carries it out.
            sr.retire -= 1
            return None
        if trio.current_time() < waiting.deadline:
            continue  # woken for a retirement another worker has carried out already
        # Not counting those retired already whose resource is still closing: two idle
        # workers timing out together would both see the other and both go. And not
        # while others are still opening theirs (as the autoscaler): this one may be the
        # only one able to take the next items.
        n = c.workers - sr.leaving
        if n > sr.opts.min_workers and not sr.opening:
            sr.run.log.info(
                "workers_scaled",
                stage=sr.name,
                old=n,
                new=n - 1,
                reason=f"worker idle for {IDLE_RETIRE:g}s",
            )
            return None


def load(inbox: Edge) -> float:
    """How full an input queue is, 0..1; 1 when senders are waiting on it."""
    if inbox.senders_waiting:
        return 1.0
    cap = inbox.capacity
    return len(inbox) / cap if cap else 0.0


async def supervise(sr: StageRun, nursery: trio.Nursery, inbox: Edge) -> None:
    """Autoscaling: grow at the high watermark, shrink at the low one after a
    cool-down (hysteresis), never below min or above max; every decision logged."""
    c = sr.c
    opts = sr.opts
    now = sr.run.now
    log = sr.run.log
    last_change = now()
    try:
        while True:
            with trio.move_on_after(SCALE_INTERVAL):
                await sr.workers_gone.wait()
            if sr.workers_gone.is_set():
                return
            fill = load(inbox)
            # Growth counts workers retired whose resource is still closing (never more
            # than max_workers resources at once); shrinking does not (it would go on
            # retiring while they close: below min_workers, to no worker at all).
            n = c.workers - sr.retire
            active = n - sr.leaving
            if fill >= GROW_AT and n < opts.max_workers:
                add = min(opts.max_workers - n, max(1, n // 2))
                # Workers asked to retire and not gone yet (all were busy) stay instead.
                stay = min(sr.retire, add)
                sr.retire -= stay
                for _ in range(add - stay):
                    sr.start_worker(nursery, inbox)
                log.info(
                    "workers_scaled",
                    stage=sr.name,
                    old=n,
                    new=n + add,
                    reason=f"queue {fill:.0%} full",
                )
                last_change = now()
            elif (
                fill <= SHRINK_AT
                and active > opts.min_workers
                # Not while workers are still opening their resources: the idle one
                # retired would be the only one able to take items.
                and not sr.opening
                and now() - last_change >= SHRINK_COOLDOWN
                # A worker stays idle after this one retires: one busy worker of two
                # (an item stuck in a long call) is no capacity to spare. Retiring the
                # other would leave none: the queue fills, the stage grows, and shrinks
                # again, for as long as the call lasts, each item waiting meanwhile.
                and c.busy_workers < active - 1
            ):
                sr.retire += 1
                if sr.idle:
                    # An idle worker retires now: one waiting for items would not see
                    # the request before its next item (or its idle spell's end).
                    sr.idle.pop().cancel()
                log.info(
                    "workers_scaled",
                    stage=sr.name,
                    old=active,
                    new=active - 1,
                    reason=f"queue {fill:.0%} full",
                )
                last_change = now()
    finally:
        inbox.keeper_done()
        sr.sender_done()
