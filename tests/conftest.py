"""Shared fixtures: every test is a Trio test (trio_mode); time-based tests take
``autojump_clock`` so sleeps are instant and times exact."""

from __future__ import annotations

import pytest

from pipeflow.testing import running_threads


@pytest.fixture(autouse=True)
def _no_thread_left_behind():
    """After every test, no pipeflow worker thread may still be running."""
    yield
    assert running_threads() == []
