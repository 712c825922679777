"""Running on: a worker that has an item's result takes it through the next stages'
functions itself, when they have nothing else to do.

At low load an item travels alone, and each hop to the next stage's worker costs a
scheduler round: the worker hands the item over, the next stage's worker is woken, and
only in the next round does it call its function. A hand-written Trio pipeline pays that
round at every hop too. But when the next stage has a worker waiting with nothing queued,
the item would be that worker's at once; so the worker that has the item calls the next
stage's function on it there and then, counted in that stage's statistics as that
stage's work (queue wait 0), and goes on to the stage after it the same way, up to the
first stage that is busy or the outlet.

Only where nothing a user relies on can tell the difference (``runs_on_to`` in run.py):
the next stage is a plain ``async def`` with one argument, no resource, no per-item
policy (timeout, retries, rate, breaker), not batched, keyed, ordered, autoscaled or a
dead-letter stage, and its items have been quick (``StageRun.chunked``); and only while
it has a worker waiting. A function that then waits after all (I/O), or raises, or
whose result has no room after its stage, goes to that waiting worker (``Edge.hand``),
which finishes it as its own: the waiting, the failure and its policy, the hand-on. So a
stage never has more calls at once than workers, and a failure is dealt with by its own
stage. A call that waits is still driven by the task that began it (its cancel scopes
are that task's), which leaves its own stage for it: a new worker takes its seat there
(``StageRun.start_worker(seat=)``), so that stage keeps all its workers meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import trio

from .._errors import Failed
from .calls import Resume
from .envelope import Env

if TYPE_CHECKING:
    from .worker import StageRun


class Lent:
    """A call of a stage's function that a worker of an earlier stage began (running
    on), handed to one of the stage's waiting workers to finish as its own: its start,
    and its outcome once known (``done`` is set then, if it had to wait)."""

    __slots__ = ("done", "end", "error", "t0", "value")

    def __init__(self, t0: float, end: float = 0.0) -> None:
        self.t0 = t0
        self.end = end
        self.value: Any = None
        self.error: BaseException | None = None
        self.done: trio.Event | None = None

    async def outcome(self) -> Any:
        """The call's result, or its error raised; waits while the call runs on in the
        other worker."""
        if self.done is not None:
            # Shielded: the call is the other task's to end, and a stop ends it there
            # (its error comes here, below). A call that ends anyway (it finished in
            # the same round, or ran shielded) is this worker's to count and hand on.
            with trio.CancelScope(shield=True):
                await self.done.wait()
        error = self.error
        if error is None:
            return self.value
        if not isinstance(error, Exception):
            # The call was stopped in the other worker: the run is stopping, and this
            # worker's own cancellation says so (a KeyboardInterrupt is passed on).
            await trio.lowlevel.checkpoint()
        raise error


#: A call that waits: the coroutine, what it is waiting for, and where its outcome goes.
Running = tuple[Any, Any, Lent]


@trio.lowlevel.enable_ki_protection
def _hand(sr: StageRun, env: Env, lent: Lent) -> None:
    """Give ``env`` and its call to the stage's worker that has waited longest (a
    KeyboardInterrupt between the two would leave that worker an item to call anew)."""
    env.t = lent.t0  # it did not queue
    task = sr.inbox.hand([env])
    if task is not None:
        sr.lent[task] = lent
        return
    # The worker that waited is gone: the call itself cancelled a scope around the run
    # (it is stopping). A new worker of the stage begins with the item instead, to deal
    # with it as the one that waited would have.
    assert sr.nursery is not None
    sr.start_worker(sr.nursery, sr.inbox, first=(env, lent))


def goes_on(nxt: StageRun | None, result: Any) -> TypeGuard[StageRun]:
    """Whether a result goes on through ``nxt`` (a stage's ``runs_on_to``) in this
    task: its items have been quick, and it has a worker waiting with nothing queued."""
    return nxt is not None and nxt.chunked and type(result) is not Failed and nxt.inbox.waits_idle()


def run_on(sr: StageRun, env: Env, t0: float) -> Running | None:
    """Call ``sr``'s function on ``env`` (an earlier stage made it at ``t0``; ``sr``
    is quick, and its inbox :meth:`~pipeflow._run.edge.Edge.waits_idle`), then go on to
    the next stage the same way, or hand the result over after it. Returns None when the
    item is done with here, or the call that waits, for the caller to drive to its end
    (``Resume``) and to report to the worker now holding it."""
    while True:
        coro = sr.stepper(env.item)  # type: ignore[misc]  # set for every sr run on to
        try:
            trap = coro.send(None)
        except StopIteration as stop:
            result = stop.value
        except Exception as exc:
            lent = Lent(t0, sr.run.now())
            lent.error = exc
            _hand(sr, env, lent)
            return None
        except BaseException:
            sr.run.unfinish(sr, [env], counted=False)  # a stop took it: cancelled
            raise
        else:
            # It waits (I/O): one of the stage's workers holds it from now on, and the
            # stage takes its items one at a time again (no more running on to it).
            _not_quick(sr)
            lent = Lent(t0)
            lent.done = trio.Event()
            _hand(sr, env, lent)
            return coro, trap, lent
        end = sr.run.now()
        nxt = sr.runs_on_to
        if goes_on(nxt, result):
            env.item = result
            _record(sr, t0, end)
            sr, t0 = nxt, end
            continue
        item = env.item
        env.item = result
        if sr.out.put_now([env], end):
            _record(sr, t0, end)
            return None
        # No room after this stage: its worker waits for room, as for its own result.
        # (The item goes with its input, as a call's does, whatever the result is.)
        env.item = item
        lent = Lent(t0, end)
        lent.value = result
        _hand(sr, env, lent)
        return None


def _record(sr: StageRun, t0: float, end: float) -> None:
    """An item of ``sr`` that went well, run on: what its own worker's record of a lone
    item counts (``StageRun._record_one``), with no worker's state to change."""
    c = sr.c
    d = end - t0
    c.items_in += 1
    c.ok += 1
    c.items_out += 1
    c.busy_time += d
    c.waits.observe(0.0)
    c.durations.observe(d)
    if d > sr.quick_below:
        _not_quick(sr)


def _not_quick(sr: StageRun) -> None:
    """A call run on was not quick: the stage's items go one at a time again, a worker
    woken for each (what its own worker's record sets after such a call)."""
    sr.chunked = False
    sr.inbox.wake_all = True


async def drive_on(running: Running, now: Callable[[], float]) -> None:
    """Run a call that waits to its end in this task (its cancel scopes are this
    task's, which has left its own stage for it), and report its outcome to the worker
    that holds it."""
    coro, trap, lent = running
    try:
        lent.value = await Resume(coro, trap)
    except Exception as exc:
        lent.error = exc
    except BaseException as exc:
        lent.error = exc
        raise
    finally:
        lent.end = now()
        assert lent.done is not None
        lent.done.set()


def abandon(running: Running, error: BaseException) -> None:
    """A call that waits will not be driven (``error`` came first): its holder is told,
    and the coroutine is closed (its ``finally`` blocks run)."""
    coro, _, lent = running
    lent.error = error
    assert lent.done is not None
    lent.done.set()
    with contextlib.suppress(BaseException):
        coro.close()
