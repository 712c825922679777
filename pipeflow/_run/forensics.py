"""What each worker is doing now, and the stall watcher: a goroutine profile for pipelines.

Each worker keeps one :class:`WorkerState` record, written a few times per chunk of
items (never per item on the quick paths): what it is doing (starting, waiting for
input, calling an item, throttled by a rate token or a breaker, handing outputs on) and
since when. Readers (:func:`worker_statuses`, the metrics endpoint's ``/workers`` page,
the live views) turn the records into :class:`WorkerStatus` snapshots.

One watcher task per run (:func:`watch_stalls`) reads the records and logs
``stage_stalled`` once for an item that has been in a worker longer than the stage's
``stall_after=``; the worker logs ``stage_unstalled`` when that item leaves. No timer per
item: the watcher sleeps until the earliest moment a stall can begin.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio

from .._errors import short_repr

if TYPE_CHECKING:
    from .run import Run
    from .worker import StageRun

WorkerActivity = Literal["starting", "waiting", "calling", "throttled", "sending"]

STARTING: WorkerActivity = "starting"  # opening its resource, before its first item
WAITING: WorkerActivity = "waiting"  # for input: the stage's queue is empty
CALLING: WorkerActivity = "calling"  # the stage's function, on an item
THROTTLED: WorkerActivity = "throttled"  # waiting for a rate-limit token or a held breaker
SENDING: WorkerActivity = "sending"  # handing outputs to the next stage (blocked when long)

#: ``stall_after=None``: an item is stalled after this many times the stage's p99
#: duration so far, and never before :data:`STALL_FLOOR` seconds.
STALL_FACTOR = 10.0
STALL_FLOOR = 10.0


class WorkerState:
    """One worker's record, written by the worker itself (a few attribute writes per
    chunk of items) and read by the watcher and the live views."""

    __slots__ = ("at", "chunk", "index", "since", "stalled", "state", "throttled_since")

    def __init__(self, index: int, now: float) -> None:
        self.index = index
        self.state: WorkerActivity = STARTING
        self.since = now  # when the current state (for CALLING: the chunk) began
        self.chunk: list[Any] | None = None  # the envelopes being called (CALLING)
        self.at = 0  # index in ``chunk`` of the item being called
        self.throttled_since = 0.0
        self.stalled = False  # stage_stalled logged for the current chunk


@attrs.frozen(kw_only=True)
class WorkerStatus:
    """What one worker is doing now: a snapshot, from :meth:`Pipeline.current_workers`.

    ``state`` is ``"starting"`` (opening its resource), ``"waiting"`` (for input),
    ``"calling"`` (the stage's function on ``item``), ``"throttled"`` (waiting for a
    ``rate=`` token or a held breaker, for ``item``) or ``"sending"`` (handing its
    outputs to the next stage: blocked there when ``seconds`` grows). ``seconds`` is the
    time in that state; for ``"calling"`` and ``"throttled"``, the time ``item`` has been
    in the worker. ``stalled`` is True once that time, less throttled waits, passed the
    stage's ``stall_after`` (the option, or its default derived from the stage's
    latency: see the observability docs).
    """

    stage: str
    worker: int
    state: WorkerActivity
    seconds: float
    item: str | None = None
    stalled: bool = False
    stall_after: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The status as plain data (JSON-ready)."""
        return attrs.asdict(self)


def stall_limit(sr: StageRun) -> float:
    """Seconds after which an item in one of ``sr``'s workers counts as stalled: the
    stage's ``stall_after=``, else :data:`STALL_FACTOR` x its p99 duration so far, at
    least :data:`STALL_FLOOR`, and at least the time its attempts may take by its
    ``timeout=`` (timeout x attempts)."""
    opts = sr.opts
    if opts.stall_after is not None:
        return float(opts.stall_after)
    limit = STALL_FLOOR
    durations = sr.c.durations
    if durations.count:
        limit = max(limit, STALL_FACTOR * durations.quantile(0.99))
    if opts.timeout is not None:
        attempts = 1 + (opts.retries.attempts if opts.retries is not None else 0)
        limit = max(limit, opts.timeout * attempts)
    return limit


def _item_text(sr: StageRun, ws: WorkerState) -> str | None:
    chunk = ws.chunk
    if not chunk:
        return None
    at = min(ws.at, len(chunk) - 1)
    text = short_repr(chunk[at].item)
    if sr.chunk_call is not None and len(chunk) > 1:
        # The chunk's items run one after another in one thread call.
        text += f" (first of {len(chunk)} items in one thread call)"
    return text


def _working_age(sr: StageRun, task: trio.lowlevel.Task, ws: WorkerState, now: float) -> float:
    """Seconds the current chunk has been in the worker, less throttled waits."""
    age = now - ws.since - sr.throttled.get(task, 0.0)
    if ws.state == THROTTLED:
        age -= now - ws.throttled_since
    return max(0.0, age)


def worker_statuses(sr: StageRun, now: float) -> list[WorkerStatus]:
    """``sr``'s workers now, by worker number."""
    limit = stall_limit(sr)
    out = []
    for task, ws in list(sr.workers.items()):
        busy = ws.state == CALLING or ws.state == THROTTLED
        out.append(
            WorkerStatus(
                stage=sr.name,
                worker=ws.index,
                state=ws.state,
                seconds=max(0.0, now - ws.since),
                item=_item_text(sr, ws) if busy else None,
                stalled=busy and (ws.stalled or _working_age(sr, task, ws, now) >= limit),
                stall_after=limit,
            )
        )
    out.sort(key=lambda s: s.worker)
    return out


def run_worker_statuses(run: Run) -> list[WorkerStatus]:
    """Every worker of ``run`` (main stages, then dead-letter stages)."""
    now = run.now()
    return [s for sr in (*run.stages, *run.dead_letter_runs) for s in worker_statuses(sr, now)]


def note_unstalled(sr: StageRun, ws: WorkerState, seconds: float, *, stopped: bool) -> None:
    """The worker is done with a chunk the watcher called stalled (``seconds`` in the
    worker, less throttled waits): say so, once."""
    ws.stalled = False
    sr.run.log.info(
        "stage_unstalled",
        stage=sr.name,
        worker=ws.index,
        item=_item_text(sr, ws),
        seconds=seconds,
        outcome="stopped" if stopped else "finished",
    )


def _watched(sr: StageRun) -> bool:
    """Whether the watcher looks at ``sr``: always with ``stall_after=``; with the
    default, only on a real clock. Under a ``trio.testing.MockClock`` the watcher's
    wake-ups would be timers that an autojumping clock jumps to while a test waits for
    real I/O (a loopback server), moving its time on: there the default is off."""
    if sr.opts.stall_after is not None:
        return True
    testing = sys.modules.get("trio.testing")  # a MockClock means it is imported
    mock = testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)
    return not mock


async def watch_stalls(run: Run) -> None:
    """The run's one stall watcher: logs ``stage_stalled`` once per stalled chunk.

    It sleeps until the earliest moment an item could pass its stage's limit: the oldest
    unflagged item's, or a whole limit from now (an item that starts after this look).
    """
    log = run.log
    watched = [sr for sr in (*run.stages, *run.dead_letter_runs) if _watched(sr)]
    if not watched:
        return
    while True:
        now = run.now()
        wake = now + 3600.0
        for sr in watched:
            limit = stall_limit(sr)
            wake = min(wake, now + limit)
            for task, ws in list(sr.workers.items()):
                if ws.stalled or (ws.state != CALLING and ws.state != THROTTLED):
                    continue
                age = _working_age(sr, task, ws, now)
                due = now + (limit - age)
                # (Within the clock's resolution of the limit is at it: a wake-up at
                # ``now`` would find the same age again, for ever under a MockClock.)
                if age >= limit or due <= now:
                    ws.stalled = True
                    log.warning(
                        "stage_stalled",
                        stage=sr.name,
                        worker=ws.index,
                        item=_item_text(sr, ws),
                        seconds=age,
                        stall_after=limit,
                    )
                else:
                    wake = min(wake, due)
        await trio.sleep_until(wake)
