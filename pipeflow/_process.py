"""``run_in="process"``: CPU-bound stages in worker processes, through trio-parallel.

The function and its items cross a process boundary, so they must pickle; a function
that cannot (a lambda, a closure, a function defined in ``__main__`` of an interactive
session) is refused when the pipeline is built, with the reason.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio


def check_picklable(fn: Callable[..., Any], stage: str) -> None:
    try:
        pickle.dumps(fn)
    except Exception as exc:
        msg = (
            f"stage {stage!r}: run_in='process' needs a function that pickles (defined at "
            f"module top level, not a lambda or a closure); pickling "
            f"{getattr(fn, '__qualname__', fn)!r} failed: {exc}"
        )
        raise TypeError(msg) from exc


class ProcessPool:
    """A stage's worker processes for one run: opened before its workers start, shut
    down (and waited for) when they have all finished, so no process outlives the run."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.context: Any = None

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        trio_parallel = _import_trio_parallel(self.stage)
        async with trio_parallel.open_worker_context(grace_period=5.0) as ctx:
            self.context = ctx
            try:
                yield
            finally:
                self.context = None

    async def warm(self) -> None:
        """Make sure an idle worker process is ready, outside any timeout: starting a
        process takes a good part of a second, which must not count against an item's
        ``timeout=`` (nor, after a timeout killed a worker, against the next item's)."""
        await self.context.run_sync(_ready)


def _ready() -> None:
    """A no-op run in a worker process to start it."""


def _import_trio_parallel(stage: str) -> Any:
    try:
        import trio_parallel  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the installation
        msg = (
            f"stage {stage!r}: run_in='process' needs trio-parallel; "
            f"install it with: pip install 'pipeflow[process]'"
        )
        raise RuntimeError(msg) from exc
    return trio_parallel


def process_call(
    target: Callable[..., Any], limiter: trio.CapacityLimiter, pool: ProcessPool
) -> Callable[[Any, Any], Awaitable[Any]]:
    _import_trio_parallel(pool.stage)
    check_picklable(target, pool.stage)

    async def call_process(item: Any, _: Any) -> Any:
        # kill_on_cancel: a timeout or a cancelled run kills the worker process rather
        # than waiting for a CPU-bound function that will never check for cancellation.
        # A worker that dies fails this item (BrokenWorkerError); the next gets a new one.
        return await pool.context.run_sync(target, item, limiter=limiter, kill_on_cancel=True)

    return call_process
