"""Helpers for testing pipelines: run on a mock clock, capture failures and outputs,
and prove that nothing was left running.

Every task, thread and worker process pipeflow starts carries a name beginning with
``pipeflow:``, so a test can check that a run left none behind::

    async def test_my_pipeline_cleans_up():
        await pipeline.arun(items)
        assert_nothing_left_running()
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import AsyncIterable
from typing import Any, TypeVar

import trio
import trio.testing

from ._errors import Failed
from ._pipeline import Pipeline, RunResult

T = TypeVar("T")

__all__ = [
    "FailureRecorder",
    "assert_nothing_left_running",
    "collect",
    "run_on_mock_clock",
    "running_tasks",
    "running_threads",
]

PREFIX = "pipeflow:"


def _walk(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found.extend(_walk(child))
    return found


def running_tasks() -> list[str]:
    """Names of pipeflow's Trio tasks still alive in the current ``trio.run``."""
    root = trio.lowlevel.current_root_task()
    if root is None:  # pragma: no cover - only outside trio.run
        return []
    return [t.name for t in _walk(root) if t.name.startswith(PREFIX)]


def running_threads() -> list[str]:
    """Names of threads still running pipeflow work (idle cached threads excluded)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(PREFIX)]


def assert_nothing_left_running() -> None:
    """Fail if any pipeflow task (when called inside Trio) or worker thread is alive."""
    left: list[str] = []
    with contextlib.suppress(RuntimeError):  # outside trio.run: only threads can be checked
        left.extend(running_tasks())
    left.extend(running_threads())
    if left:
        raise AssertionError(f"pipeflow left {len(left)} running: {sorted(set(left))}")


def run_on_mock_clock(
    pipeline: Pipeline[Any, T],
    source: Any,
    *,
    autojump_threshold: float = 0.0,
    **run_options: Any,
) -> RunResult[T]:
    """Run ``pipeline`` over ``source`` under ``trio.testing.MockClock``, from a plain
    (non-async) test: sleeps, timeouts, rate limits and batch timeouts take no real
    time, and ``result.elapsed`` is exact.

    >>> result = run_on_mock_clock(Pipeline(slow_stage), range(3))   # doctest: +SKIP
    >>> result.elapsed
    3.0
    """
    clock = trio.testing.MockClock(autojump_threshold=autojump_threshold)
    run = functools.partial(pipeline.arun, source, **run_options)
    return trio.run(run, clock=clock)


class FailureRecorder:
    """A dead-letter sink that keeps every :class:`~pipeflow.Failed` it receives::

    failures = FailureRecorder()
    Pipeline(parse, dead_letter=failures).run(lines)
    assert failures.items == ["not json"]
    """

    def __init__(self) -> None:
        self.failures: list[Failed[Any]] = []

    def __call__(self, failed: Failed[Any]) -> None:
        self.failures.append(failed)

    @property
    def items(self) -> list[Any]:
        """The failed items, in the order they failed."""
        return [f.item for f in self.failures]

    def by_stage(self) -> dict[str, list[Any]]:
        """Failed items grouped by the stage they failed in."""
        grouped: dict[str, list[Any]] = {}
        for f in self.failures:
            grouped.setdefault(f.stage, []).append(f.item)
        return grouped


async def collect(outputs: AsyncIterable[T]) -> list[T]:
    """Read every output of ``Pipeline.stream()`` (or ``open(outputs=True)``) into a list."""
    return [out async for out in outputs]
