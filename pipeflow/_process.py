"""``run_in="process"``: CPU-bound stages in worker processes, through trio-parallel.

The function and its items cross a process boundary, so they must pickle; a function
that cannot (a lambda, a closure, a function defined in ``__main__`` of an interactive
session) is refused when the pipeline is built, with the reason.
"""

from __future__ import annotations

import pickle
from collections.abc import Awaitable, Callable
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


def process_call(
    target: Callable[..., Any], limiter: trio.CapacityLimiter, stage: str
) -> Callable[[Any, Any], Awaitable[Any]]:
    try:
        import trio_parallel  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the installation
        msg = (
            f"stage {stage!r}: run_in='process' needs trio-parallel; "
            f"install it with: pip install 'pipeflow[process]'"
        )
        raise RuntimeError(msg) from exc
    check_picklable(target, stage)

    async def call_process(item: Any, _: Any) -> Any:
        # kill_on_cancel: a timeout or a cancelled run kills the worker process rather
        # than waiting for a CPU-bound function that will never check for cancellation.
        return await trio_parallel.run_sync(target, item, limiter=limiter, kill_on_cancel=True)

    return call_process
