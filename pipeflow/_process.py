"""``run_in="process"``: CPU-bound stages in worker processes, through trio-parallel.

The function and its items cross a process boundary, so they must pickle; a function
that cannot (a lambda, a closure, a function defined in ``__main__`` of an interactive
session) is refused when the pipeline is built, with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import pickle
import re
import sys
import tokenize
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio


class ByName:
    """A picklable reference to a module-level function, resolved in the worker process.

    ``@stage(run_in="process")`` on a top-level function leaves the module attribute
    holding the stage, not the function, so pickle cannot send the function by
    reference; this sends its module and qualified name instead and calls the function
    behind whatever the name holds there (the stage, or the plain function).
    """

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def __reduce__(self) -> tuple[Any, ...]:
        return (ByName, (self.module, self.qualname))

    def resolve(self) -> Callable[..., Any]:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        # A FunctionStage keeps the plain function as ``fn``.
        fn = getattr(obj, "fn", obj)
        if not callable(fn):
            raise TypeError(f"{self.module}.{self.qualname} is not callable")
        return fn  # type: ignore[no-any-return]

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*args)


def picklable_target(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    """``fn`` itself if it pickles, else a :class:`ByName` reference to it; raise a
    TypeError that says why when neither can reach a worker process."""
    try:
        pickle.dumps(fn)
        return fn
    except Exception as exc:
        error: Exception = exc
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        ref = ByName(module, qualname)
        try:
            if ref.resolve() is fn:
                return ref
        except Exception as exc:
            error = exc
    msg = (
        f"stage {stage!r}: run_in='process' needs a function that pickles (defined at "
        f"module top level, not a lambda or a closure); pickling "
        f"{qualname or fn!r} failed: {error}"
    )
    raise TypeError(msg) from error


def check_picklable(fn: Callable[..., Any], stage: str) -> None:
    picklable_target(fn, stage)
    check_main_guard(stage)


_GUARD = re.compile(
    r"""^\s*if\s+\(?\s*(__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__)""",
    re.MULTILINE,
)


def _missing_guard_message(stage: str, script: str) -> str:
    return (
        f"stage {stage!r}: run_in='process' starts worker processes that import the main "
        f'script {script} again, and it has no `if __name__ == "__main__":` guard, so '
        f"each would run the pipeline again. Put the code that runs the pipeline under "
        f'`if __name__ == "__main__":` at the end of the script.'
    )


def check_main_guard(stage: str) -> None:
    """Refuse a main script without ``if __name__ == "__main__":``: worker processes
    (started by a fork server, or spawned where there is none) import the main script
    again, and without the guard each would run the pipeline again, fail, and bury the
    reason under one traceback per process."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return  # an interactive session, python -c, a notebook: nothing is re-imported
    try:
        with tokenize.open(path) as f:
            source = f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return
    if not _GUARD.search(source):
        raise RuntimeError(_missing_guard_message(stage, path))


class ProcessPool:
    """A stage's worker processes for one run: opened before its workers start, shut
    down (and waited for) when they have all finished, so no process outlives the run."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.context: Any = None

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        trio_parallel = _import_trio_parallel(self.stage)
        # forkserver where the platform has it (spawn elsewhere); both start a worker
        # by importing the main script again. A new worker forks from a small, clean
        # server process (safe in a threaded program, unlike fork) and starts about
        # twice as fast as a spawned interpreter, which matters since each run starts
        # its own workers.
        worker_type = trio_parallel.WorkerType.SPAWN
        if "forkserver" in multiprocessing.get_all_start_methods():
            worker_type = trio_parallel.WorkerType.FORKSERVER
        async with trio_parallel.open_worker_context(
            grace_period=5.0, worker_type=worker_type
        ) as ctx:
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
            f"install it with: pip install 'pipeflow-trio[process]'"
        )
        raise RuntimeError(msg) from exc
    return trio_parallel


def process_call(
    target: Callable[..., Any], limiter: trio.CapacityLimiter, pool: ProcessPool
) -> Callable[[Any, Any], Awaitable[Any]]:
    _import_trio_parallel(pool.stage)
    target = picklable_target(target, pool.stage)

    async def call_process(item: Any, _: Any) -> Any:
        # kill_on_cancel: a timeout or a cancelled run kills the worker process rather
        # than waiting for a CPU-bound function that will never check for cancellation.
        # A worker that dies fails this item (BrokenWorkerError); the next gets a new one.
        return await pool.context.run_sync(target, item, limiter=limiter, kill_on_cancel=True)

    return call_process
