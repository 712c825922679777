"""The edge: the one place where an item crosses from one task to another.

An :class:`Edge` is a bounded, many-to-many queue of envelopes, counted in items. It is
what a Trio memory channel is to a hand-written pipeline, with three differences that
make pipeflow faster than one:

- items move in *chunks*: a worker hands over the list of outputs it made, and takes
  the items already waiting (up to a bound), never waiting for a chunk to fill, so a
  lone item at low load still travels alone (a stage whose items take long takes one
  at a time, so that its items spread over its workers: see ``worker.py``);
- the hand-off that would not block costs no scheduler round (the ``*_nowait`` fast
  path is the ordinary path); callers checkpoint every few items instead;
- it stamps what the runner needs (the sequence number for ordered stages, the time
  for queue wait) and keeps what a stop strands, so accounting after a stop is exact.

Lifetimes follow the trio docs' ``channels-mpmc-fixed`` pattern: every task that sends
or receives registers first and leaves when done. When the last sender leaves, the
receivers see the end once the queue is empty (the cascading close); when the last
receiver leaves, senders are refused (the run is stopping).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import outcome
import trio
from trio.lowlevel import Abort, Task, current_task, enable_ki_protection, reschedule
from trio.lowlevel import wait_task_rescheduled as _wait_rescheduled

from .envelope import Env

#: The most items a worker takes (or a reader pulls) at once. A worker that never has to
#: wait checkpoints at least this often, so cancellation stays prompt.
CHUNK = 32
#: A stage whose items take longer than this each (measured) takes one item at a time,
#: so that slow (I/O) items spread over its workers instead of queueing behind each
#: other in one worker's chunk; below it, a worker takes every item already waiting.
CHUNK_BELOW = 0.0005


class Lot(OrderedDict[Task, int]):
    """Tasks waiting on an edge, oldest first, woken first come, first served.

    What :class:`trio.lowlevel.ParkingLot` does for the edge, without what it does not
    use (breaking, generic counts): one ``reschedule`` per wake and nothing more, which
    is a third cheaper on the hop every item makes. An ordered dict itself, so that
    ``len`` and truth, asked on every hand-over, cost no Python call, and a cancelled
    wait leaves in one step however many wait (thousands of ``open()`` senders).
    """

    __slots__ = ()

    @enable_ki_protection
    async def park(self, wants: int = 1) -> Any:
        """Wait until :meth:`unpark` wakes this task (or it is cancelled). ``wants``: how
        many slots the task waits for (a sender's items), for :meth:`unpark_for`.
        Returns None, or what :meth:`Edge.hand` gave this task."""
        task = current_task()
        self[task] = wants

        def abort(_: object) -> Abort:
            del self[task]
            return Abort.SUCCEEDED

        return await _wait_rescheduled(abort)

    @enable_ki_protection
    def unpark(self, count: int = 1) -> int:
        """Wake up to ``count`` waiting tasks, oldest first; how many were woken."""
        if count == 1 and self:  # the usual case: one item, one receiver
            reschedule(self.popitem(last=False)[0])
            return 1
        n = min(count, len(self))
        for _ in range(n):
            reschedule(self.popitem(last=False)[0])
        return n

    def unpark_all(self) -> int:
        return self.unpark(len(self))

    @enable_ki_protection
    def unpark_for(self, room: int) -> int:
        """Wake the oldest waiting tasks, as many as ``room`` slots can serve (each
        wants what it parked with); how many were woken. A sender of a chunk is woken
        once for it, not once per slot that frees up."""
        n = 0
        while room > 0 and self:
            task, wants = self.popitem(last=False)
            reschedule(task)
            room -= wants
            n += 1
        return n


class Edge:
    """A bounded queue of :class:`Env` between tasks, with capacity counted in items."""

    __slots__ = (
        "_buf",
        "_closed",
        "_holders",
        "_keepers",
        "_receivers",
        "_recv_lot",
        "_send_lot",
        "_senders",
        "_waking",
        "away",
        "broken",
        "capacity",
        "now",
        "numbered",
        "on_end",
        "seq",
        "stamp",
        "stranded",
        "wake_all",
        "woke",
    )

    def __init__(
        self, capacity: int, now: Callable[[], float] = trio.current_time, *, stamp: bool = True
    ) -> None:
        self.capacity = capacity
        self.now = now
        # An edge behind a shaper that already numbered the items (a key router, a
        # batcher) keeps their numbers and entry times.
        self.stamp = stamp
        # Sequence numbers only where the receiver needs them (ordered and keyed
        # stages); set by the stage.
        self.numbered = False
        # Wake a waiting receiver per item (receivers that take one item at a time), or
        # one per CHUNK items (receivers that take what is waiting): set by the stage.
        self.wake_all = True
        self.seq = 0  # the next sequence number this edge stamps
        self.broken = False  # every receiver has left
        self.stranded: list[Env] = []  # items a stopped sender could not hand over
        # Called once, when the last sender leaves: the receiving stage ends the opens
        # of workers no item will come for (StageRun.end_openings), so that whoever
        # closes an edge (the source's task, a shaper, a stage) need not know of them.
        self.on_end: Callable[[], None] | None = None
        self._buf: deque[Env] = deque()
        self._closed = False  # every sender has left
        # Receivers holding a chunk they may give back (put_back): until they are done,
        # an empty closed edge is not yet at its end for the others.
        self._holders = 0
        self._senders = 0
        self._receivers = 0
        # Tasks that keep the edge open for receivers they may start (the autoscaler)
        # but take nothing: not receivers a hand-over may count on to come back for it.
        self._keepers = 0
        self._recv_lot = Lot()
        self._send_lot = Lot()
        # Receivers woken for an item that have not run yet: like those still parked,
        # each will take an item, so they count as room (as a rendezvous hand-off).
        self._waking = 0
        # Receivers the last hand-over woke (0 if none was parked).
        self.woke = 0
        # Receivers away from this edge for a while: in a call of the stage's function
        # (a hand-over can only happen during one if the call waits: I/O), or waiting
        # for room to hand their outputs on. Not coming back soon, so not counted on.
        self.away = 0

    # -- lifetimes --------------------------------------------------------------------------

    def add_sender(self) -> None:
        self._senders += 1

    def sender_done(self) -> None:
        self._senders -= 1
        if self._senders == 0 and not self._closed:
            self._closed = True
            self._waking += len(self._recv_lot)
            self._recv_lot.unpark_all()
            if self.on_end is not None:
                self.on_end()

    def add_receiver(self) -> None:
        self._receivers += 1

    def receiver_done(self) -> None:
        self._receivers -= 1
        if self._buf and self._recv_lot:
            # Items handed over while this receiver was at work woke no one (_add counts
            # on it to come back for them); it has left instead (retired by the
            # autoscaler, say): wake one that waits.
            self._waking += self._recv_lot.unpark()
        self._break_if_unheld()

    def add_keeper(self) -> None:
        """A task that may start receivers (the autoscaler) holds the edge open, as a
        receiver would, without counting as one that will come back for items."""
        self._keepers += 1

    def keeper_done(self) -> None:
        self._keepers -= 1
        self._break_if_unheld()

    def _break_if_unheld(self) -> None:
        """Once no receiver or keeper holds the edge, senders are refused."""
        if self._receivers == 0 and not self._keepers and not self.broken:
            self.broken = True
            self._send_lot.unpark_all()

    # -- sending -----------------------------------------------------------------------------

    async def put(self, envs: list[Env]) -> float:
        """Hand ``envs`` over in order, waiting while the edge is full.

        Returns the seconds spent waiting: 0.0 on the fast path, which reads no clock
        beyond the stamp and yields to no one. Raises ``trio.BrokenResourceError`` once
        every receiver has left (after a checkpoint, so a cancellation is raised instead
        when that is why they left).
        """
        if self.put_now(envs):
            return 0.0
        return await self._put_slow(envs)

    async def _put_slow(self, envs: list[Env]) -> float:
        # Waiting starts when an item is offered, so its queue wait includes the time
        # its sender waited for room.
        t0 = self.now()
        if self.stamp:
            for env in envs:
                env.t = t0
        done = 0
        queued = bool(self._send_lot)  # others wait already: go behind them
        try:
            while True:
                if self.broken:
                    await trio.lowlevel.checkpoint()
                    raise trio.BrokenResourceError("the stage after this one has stopped")
                room = self._room()
                if room > 0 and not queued:
                    part = envs[done : done + room]
                    self._add(part)
                    done += len(part)
                    if done == len(envs):
                        break
                queued = False
                await self._send_lot.park(len(envs) - done)
        except BaseException:
            self.stranded.extend(envs[done:])
            raise
        if self._send_lot and self._room() > 0:
            self._send_lot.unpark_for(self._room())  # room is left: the next senders' turn
        return self.now() - t0

    def _room(self) -> int:
        return self.capacity - len(self._buf) + len(self._recv_lot) + self._waking

    def put_now(self, envs: list[Env], now: float | None = None) -> bool:
        """Hand ``envs`` over if they fit now; False (and nothing done) if not. ``now``:
        the time, if the sender has just read the clock."""
        room = self.capacity - len(self._buf) + len(self._recv_lot) + self._waking  # _room()
        if len(envs) > room or self._send_lot or self.broken:
            return False
        if self.stamp:
            t = self.now() if now is None else now
            for env in envs:
                env.t = t
        self._add(envs)
        return True

    def hold(self) -> None:
        """A receiver took a chunk it may give back: the end waits for it."""
        self._holders += 1

    def release(self) -> None:
        """The receiver is done with its chunk; if that was the end, say so to the
        receivers waiting for it."""
        self._holders -= 1
        if self._closed and not self._holders and not self._buf:
            self._waking += len(self._recv_lot)
            self._recv_lot.unpark_all()

    def put_back(self, envs: list[Env]) -> None:
        """Return items a receiver took but did not start, to the front of the queue,
        with their numbers and times (they were queued first)."""
        self._buf.extendleft(reversed(envs))
        lot = self._recv_lot
        if lot:
            self._waking += lot.unpark(len(envs))

    def put_nowait(self, env: Env) -> None:
        """Hand one item over, or raise ``trio.WouldBlock`` if the edge is full (or other
        senders wait for room: first come, first served)."""
        if self._send_lot or self._room() <= 0:
            raise trio.WouldBlock
        if self.stamp:
            env.t = self.now()
        self._add([env])

    def _add(self, envs: list[Env]) -> None:
        if self.stamp and self.numbered:
            seq = self.seq
            for env in envs:
                env.seq = seq
                seq += 1
            self.seq = seq
        self._buf.extend(envs)
        lot = self._recv_lot
        self.woke = 0
        if lot:
            if self.wake_all:
                n = len(envs)
            elif self._receivers > len(lot) + self._waking + self.away:
                # A receiver of quick items is at work (its bookkeeping) and will take
                # these when it comes back: waking another would only cost a scheduler
                # round.
                return
            else:
                n = -(-len(envs) // CHUNK)
            woke = lot.unpark(n)
            self._waking += woke
            self.woke = woke

    # -- receiving ---------------------------------------------------------------------------

    def take_ready(self, limit: int = CHUNK) -> list[Env]:
        """Up to ``limit`` waiting items, oldest first; an empty list when none waits.
        Raises ``trio.EndOfChannel`` once every sender has left and none is left. (The
        worker loop's form: no exception on the way to waiting, which is most hops at
        low load.)"""
        buf = self._buf
        n = len(buf)
        if not n:
            if self._closed and not self._holders:
                # The end: the receivers still parked must see it too. Items given back
                # after the close (put_back) woke only as many receivers as there were
                # items, and no close or release is left to come and wake the rest.
                if self._recv_lot:
                    self._waking += len(self._recv_lot)
                    self._recv_lot.unpark_all()
                raise trio.EndOfChannel
            return []
        if limit >= n:
            out = list(buf)
            buf.clear()
        elif limit == 1:  # a stage taking one item at a time (I/O): no comprehension
            out = [buf.popleft()]
        else:
            out = [buf.popleft() for _ in range(limit)]
        if self._send_lot:
            # Senders waiting for room, as many as the room now serves (a sender
            # waiting with a chunk is woken once, not once per item taken).
            self._send_lot.unpark_for(self._room())
        return out

    def take_nowait(self, limit: int = CHUNK) -> list[Env]:
        """As :meth:`take_ready`, but raises ``trio.WouldBlock`` when none waits."""
        out = self.take_ready(limit)
        if not out:
            raise trio.WouldBlock
        return out

    async def take(self, limit: int = CHUNK, *, empty: bool = False) -> list[Env]:
        """Wait for at least one item, then take as :meth:`take_ready` does. ``empty``:
        the caller's own :meth:`take_ready` just found nothing (wait at once)."""
        while True:
            if empty:
                empty = False
            else:
                out = self.take_ready(limit)
                if out:
                    return out
            if self._send_lot:
                # A waiting receiver is room too (a rendezvous edge has no other).
                self._send_lot.unpark()
            handed: list[Env] | None = await self._recv_lot.park()
            if handed is not None:
                return handed  # given to this receiver alone (hand)
            self._waking -= 1

    def waits_idle(self) -> bool:
        """A receiver waits for items and none is queued (nor a sender waiting): an
        item handed over now would be taken at once by a receiver with nothing to do."""
        return bool(self._recv_lot) and not self._buf and not self._send_lot

    @enable_ki_protection
    def hand(self, envs: list[Env]) -> Task | None:
        """Give ``envs`` to the receiver that has waited longest, as what its
        :meth:`take` returns, past the queue; that receiver, or None if none waits.
        For work begun elsewhere that one of the receivers must finish as its own (a
        stage's call run on from an earlier stage: see ``runon.py``); ``envs`` count in
        no capacity, as an item in a worker does not."""
        if not self._recv_lot:
            return None
        task = self._recv_lot.popitem(last=False)[0]
        reschedule(task, outcome.Value(envs))
        return task

    # -- reading the state ---------------------------------------------------------------------

    def drained(self) -> bool:
        """Every sender has left and no item is left or held: none will ever come."""
        return self._closed and not self._holders and not self._buf

    def room(self) -> int:
        """How many items a sender could hand over now without waiting."""
        if self._send_lot:
            return 0
        return self._room()

    def __len__(self) -> int:
        """Items waiting now (the queue depth)."""
        return len(self._buf)

    @property
    def senders_waiting(self) -> int:
        return len(self._send_lot)

    def leftovers(self) -> list[Env]:
        """What a stop left on this edge: queued items and those a sender could not hand
        over. Taken once, after the tasks on both sides have gone."""
        out = [*self._buf, *self.stranded]
        self._buf.clear()
        self.stranded = []
        return out
