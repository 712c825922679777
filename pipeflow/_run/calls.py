"""The call for each kind of stage, and the policy layers around it.

A stage's worker calls ``await call(item, resource)`` once per item. :func:`make_call`
builds that call from the stage's kind (async function, async generator, plain function
in a thread or inline, worker process); :func:`with_policies` wraps it, once, in the
layers the options ask for: rate limit and breaker (waits counted as throttled, not
busy), per-attempt timeout, retries with backoff.

:func:`make_chunk_call` is the batched form for plain functions in threads: the items
already waiting for one worker go to one thread call, and come back as one outcome per
item, so errors stay per item.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Generator
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import trio

from .._errors import CircuitOpen, Failed, short_repr
from .._process import process_call
from .edge import CHUNK_BELOW
from .envelope import Env, KeyFailed
from .forensics import CALLING, THROTTLED

if TYPE_CHECKING:
    from .worker import StageRun

Call = Callable[[Any, Any], Awaitable[Any]]
#: ``await chunk_call(items, resource, give_back)`` -> (one ``(error, result)`` per item
#: run, the wall seconds they took in the thread). With ``give_back``, the thread stops
#: after an item that took long, and while an item has been running for ``SLOW`` the
#: stage's watcher hands the items after it to ``give_back(k)`` (``items[k:]``, not
#: started) at once, for idle workers; the items not run are not in the outcomes.
ChunkCall = Callable[
    [list[Any], Any, Callable[[int], None] | None],
    Awaitable[tuple[list[tuple[Exception | None, Any]], float]],
]
#: A thread chunk's item still running after this long gives the items after it back.
SLOW = 4 * CHUNK_BELOW


class Claim:
    """A thread chunk's items, started one at a time by the thread: the stage's watcher
    can close it (no item starts after that) from Trio while an item runs."""

    __slots__ = ("_lock", "closed", "next", "size")

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self.size = size
        self.next = 0  # items started so far
        self.closed = False

    def take(self) -> int:
        """In the thread: the index of the next item to run, or -1 to stop."""
        with self._lock:
            if self.closed or self.next >= self.size:
                return -1
            i = self.next
            self.next += 1
            return i

    def close(self) -> int:
        """No item starts after this; how many have started."""
        with self._lock:
            self.closed = True
            return self.next


class GaveUp(Exception):
    """An item's last attempt failed; carries the attempt count to the failure path."""

    def __init__(self, error: Exception, attempts: int) -> None:
        self.error = error
        self.attempts = attempts


def _sync_body(sr: StageRun) -> Callable[[Any, Any], Any]:
    """The plain function as one call: a generator's outputs gathered in a list.

    Two mistakes are answered here, where the function returns: a coroutine (an ``async``
    function behind a plain ``def``), and a ``StopIteration``, which would otherwise
    surface as "coroutine raised StopIteration" once it crossed an ``await``."""
    target = sr.stage._target()
    gen = sr.opts.kind == "syncgen"
    name = sr.name
    if gen:
        if sr.takes_resource:
            return lambda item, res: list(target(item, res))
        return lambda item, _: list(target(item))
    takes_resource = sr.takes_resource

    def call_sync(item: Any, res: Any) -> Any:
        try:
            out = target(item, res) if takes_resource else target(item)
        except StopIteration as exc:
            msg = f"stage {name!r} raised StopIteration on item {short_repr(item)}"
            raise RuntimeError(msg) from exc
        if type(out) is CoroutineType:
            out.close()  # never run: no "was never awaited" warning on top of this error
            msg = (
                f"stage {name!r} returned a coroutine: declare it `async def` (the "
                f"result of a plain `def` is used as it is, never awaited)"
            )
            raise TypeError(msg)
        return out

    return call_sync


def make_call(sr: StageRun) -> Call:
    """``await call(item, resource)`` for the stage's kind."""
    opts = sr.opts
    target = sr.stage._target()
    takes_resource = sr.takes_resource

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

    body = _sync_body(sr)

    if opts.run_in == "task":

        async def call_inline(item: Any, res: Any) -> Any:
            return body(item, res)

        return call_inline

    if opts.run_in == "process":
        assert sr.process_pool is not None
        return process_call(target, sr.limiter, sr.process_pool)

    limiter = sr.limiter
    thread_name = f"pipeflow:{sr.run.pipeline}:{sr.name}"
    c = sr.c

    def timed_body(item: Any, res: Any) -> tuple[Any, float]:
        # CPU time of the call in its own thread: how a report tells CPU-bound work
        # (which the GIL serialises) from waiting. Lost if the call raises; fine.
        t = time.thread_time()
        out = body(item, res)
        return out, time.thread_time() - t

    async def call_thread(item: Any, res: Any) -> Any:
        out, cpu = await trio.to_thread.run_sync(
            timed_body, item, res, limiter=limiter, thread_name=thread_name
        )
        c.cpu_time += cpu
        return out

    return call_thread


def make_chunk_call(sr: StageRun) -> ChunkCall | None:
    """For a plain function in threads with no per-attempt policy: one thread call for
    the items already waiting for a worker. None for every other stage."""
    opts = sr.opts
    if opts.kind not in ("sync", "syncgen") or opts.run_in != "thread" or not sr.simple:
        return None
    body = _sync_body(sr)
    limiter = sr.limiter
    thread_name = f"pipeflow:{sr.run.pipeline}:{sr.name}"
    passthrough = sr.passthrough

    c = sr.c

    def run_all(
        items: list[Any], res: Any, claim: Claim, stop_when_slow: bool
    ) -> tuple[list[tuple[Exception | None, Any]], float, float]:
        t = time.thread_time()  # CPU time in the thread, as for one call (see make_call)
        t_wall = last = time.perf_counter()
        out: list[tuple[Exception | None, Any]] = []
        while (i := claim.take()) >= 0:
            item = items[i]
            if (passthrough and type(item) is Failed) or type(item) is KeyFailed:
                out.append((None, item))  # the worker passes these on or fails them
                continue
            try:
                out.append((None, body(item, res)))
            except Exception as exc:
                out.append((exc, None))
            if stop_when_slow:
                now = time.perf_counter()
                if now - last > CHUNK_BELOW:
                    break  # slow now: the rest go back to the stage's idle workers
                last = now
        return out, time.thread_time() - t, time.perf_counter() - t_wall

    async def chunk_call(
        items: list[Any], res: Any, give_back: Callable[[int], None] | None
    ) -> tuple[list[tuple[Exception | None, Any]], float]:
        claim = Claim(len(items))
        watched = give_back is not None and len(items) > 1 and _real_clock()
        if watched:
            assert give_back is not None
            sr.claims[claim] = give_back
            if not sr.watching_claims:
                sr.watching_claims = True
                assert sr.nursery is not None
                sr.nursery.start_soon(watch_claims, sr, name=f"{thread_name}:claims")
        try:
            out, cpu, wall = await trio.to_thread.run_sync(
                run_all,
                items,
                res,
                claim,
                give_back is not None,
                limiter=limiter,
                thread_name=thread_name,
            )
        finally:
            if watched:
                sr.claims.pop(claim, None)
        c.cpu_time += cpu
        return out, wall

    return chunk_call


def _real_clock() -> bool:
    """Not under a ``trio.testing.MockClock``: there, the watcher's timers would be
    jumped to while a thread runs in real time, and move a test's time on."""
    testing = sys.modules.get("trio.testing")
    return testing is None or not isinstance(trio.lowlevel.current_clock(), testing.MockClock)


async def watch_claims(sr: StageRun) -> None:
    """A stage's thread chunks in flight, looked at every ``SLOW``: one whose item has
    run for a whole ``SLOW`` (it blocks: on I/O, on another item of the chunk) has the
    items after it handed back to idle workers at once, while it runs. Ends when no
    chunk is in flight (a worker starts it again)."""
    seen: dict[Claim, int] = {}
    try:
        while sr.claims:
            await trio.sleep(SLOW)
            for claim, give_back in list(sr.claims.items()):
                started = claim.next
                if seen.get(claim) == started:
                    del sr.claims[claim]
                    give_back(claim.close())
                else:
                    seen[claim] = started
            seen = {claim: n for claim, n in seen.items() if claim in sr.claims}
    finally:
        sr.watching_claims = False


class Resume:
    """Awaits a coroutine that was started by hand (``coro.send(None)``) and suspended
    at ``trap``: the worker steps an ``async def`` item once to learn whether it finishes
    without waiting (then it needs no scheduler round), and resumes it with this when it
    does not. Every value the scheduler sends or throws in is passed through."""

    __slots__ = ("coro", "trap")

    def __init__(self, coro: Any, trap: Any) -> None:
        self.coro = coro
        self.trap = trap

    def __await__(self) -> Any:
        coro = self.coro
        value = self.trap
        while True:
            try:
                sent = yield value
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def make_stepper(sr: StageRun) -> Callable[..., Any] | None:
    """For an ``async def`` stage with no per-attempt policy: a function that starts the
    item's coroutine (``target(item)``), for :func:`drive` to run. None for other stages
    (and batch stages, whose batches come one at a time anyway)."""
    if sr.opts.kind != "async" or not sr.simple or sr.batched:
        return None
    return sr.stage._target()  # called as target(item), or target(item, resource)


@types.coroutine
def drive(
    target: Callable[..., Any],
    chunk: list[Env],
    failures: list[tuple[int, Exception | None]],
    res: Any,
    one_arg: bool,
    passthrough: bool,
) -> Generator[Any, Any, int]:
    """Run a chunk's ``async def`` items one after another, in one go, up to the first
    that fails; returns how many it ran.

    The worker steps this once by hand (``send(None)``). Items that finish without
    waiting (the quick stage the chunk is for) cost one ``yield from`` each: no
    ``StopIteration`` per item, no scheduler round. Each result replaces its item in the
    envelope; an item that raises keeps its item and is listed in ``failures`` with its
    error (a ``Failed`` value passing through is listed with ``None``).

    If an item waits, its trap comes out of the step: the worker gives the items after it
    back (by truncating ``chunk``, which ends this loop after the item) and resumes this
    with :class:`Resume`. ``i`` is the position of that item (read from the frame, only
    then).
    """
    for i, env in enumerate(chunk):  # i: read from the frame when an item waits
        item = env.item
        if passthrough and type(item) is Failed:
            failures.append((i, None))
            continue
        try:
            if one_arg:
                env.item = yield from target(item)
            else:
                env.item = yield from target(item, res)
        except Exception as exc:
            # Stop here: what the failure does (stop the run, spend an error budget)
            # comes before the next item starts, as if each item ran on its own.
            failures.append((i, exc))
            return i + 1
    return len(chunk)


def waiting_at(driver: Any) -> int:
    """The position of the item a suspended :func:`drive` waits in."""
    position: int = driver.gi_frame.f_locals["i"]
    return position


def with_policies(sr: StageRun, call: Call) -> Call:
    """``call`` behind the stage's rate limit, breaker, timeout and retries."""
    opts = sr.opts
    retry = opts.retries
    timeout = opts.timeout
    bucket = sr.bucket
    breaker = sr.breaker
    process_pool = sr.process_pool
    now = sr.run.now
    rng = random.Random()
    c = sr.c
    log = sr.run.log
    name = sr.name

    async def call_with_policies(item: Any, res: Any) -> Any:
        attempt = 0
        last_error: Exception | None = None
        while True:
            attempt += 1
            probe = False
            try:
                if breaker is not None or bucket is not None:
                    waited_from = now()
                    # A worker waiting for a token or a held breaker is not busy (the
                    # workers_busy gauge, the live views).
                    c.busy_workers -= 1
                    task = trio.lowlevel.current_task()
                    ws = sr.workers.get(task)
                    if ws is not None:  # what the worker does now (forensics.py)
                        ws.state = THROTTLED
                        ws.throttled_since = waited_from
                    try:
                        if breaker is not None:
                            probe = await breaker.admit()
                        if bucket is not None:
                            await bucket.acquire()
                    finally:
                        c.busy_workers += 1
                        if ws is not None:
                            ws.state = CALLING
                        # Waiting for a token or a held breaker is not work: it must not
                        # make the stage look busy (or name it the bottleneck), also
                        # when a stop ends the wait.
                        waited = now() - waited_from
                        if waited:
                            c.throttled_time += waited
                            sr.throttled[task] = sr.throttled.get(task, 0.0) + waited
                if timeout is not None and process_pool is not None:
                    await process_pool.warm()
                if timeout is None:
                    result = await call(item, res)
                else:
                    with trio.move_on_after(timeout) as scope:
                        result = await call(item, res)
                    # cancel_called, not cancelled_caught: a worker thread cannot be
                    # interrupted, so its call returns normally after the deadline.
                    if scope.cancel_called:
                        raise TimeoutError(f"stage {name!r} timed out after {timeout:g}s")
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
                    c.retried += 1
                    delay = retry.delay(attempt, rng)
                    log.info(
                        "item_retried",
                        stage=name,
                        item=short_repr(item),
                        attempt=attempt,
                        error=repr(exc),
                        delay=delay,
                    )
                    await trio.sleep(delay)
                    continue
                raise GaveUp(exc, attempt) from exc
            except BaseException:
                if probe and breaker is not None:
                    breaker.release_probe()
                raise
            if breaker is not None:
                breaker.record(True, probe)
            return result

    return call_with_policies
