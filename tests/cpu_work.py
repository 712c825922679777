"""Module-level functions for process-worker tests (worker processes import them)."""

from __future__ import annotations

import os

from pipeflow import stage


def sum_squares(n: int) -> int:
    return sum(i * i for i in range(n))


def die_on_negative(n: int) -> int:
    if n < 0:
        os._exit(13)  # the worker process dies mid-item
    return n * 2


def worker_pid(_: object) -> int:
    return os.getpid()


@stage(workers=2, run_in="process")
def cube(n: int) -> int:
    """The contract's main form: a decorated top-level function in worker processes."""
    return n**3
