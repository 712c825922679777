"""Helpers for testing pipelines: what is still running, and proof that nothing is.

Every task, thread and worker process pipeflow starts carries a name beginning with
``pipeflow:``, so a test can check that a run left none behind::

    async def test_my_pipeline_cleans_up():
        await pipeline.arun(items)
        assert_nothing_left_running()
"""

from __future__ import annotations

import contextlib
import threading

import trio

__all__ = ["assert_nothing_left_running", "running_tasks", "running_threads"]

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
