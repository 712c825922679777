"""SIGINT and SIGTERM for the whole ``pipeflow`` command, not only while a run is going.

``Pipeline.arun(handle_signals=True)`` answers a signal while its run is going (its
``SignalGate``), and puts back the handler it found when the run ends. Around it, from
the command's start to its exit, the handler found is this one:

- during start-up (imports, parsing, loading the module) a signal stops the command: a
  :class:`Stopped` is raised (a ``KeyboardInterrupt``), and the command prints one line
  and exits 128 + the signal number;
- from just before the run until the summary and the report are written it is noted,
  never fatal: handed to the run's gate if the run is starting (the gate then stops the
  run as usual), else kept for the command to exit 128 + the number of the first one.

Light on purpose: imported before the rest of the command, to cover its imports too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

from .. import _cli_start


class Stopped(KeyboardInterrupt):
    """A signal while the command was starting: it stops (one line, exit 128 + N)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signum


class CommandSignals:
    """The handler of SIGINT and SIGTERM outside a run's own (see the module)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        #: The first signal the command received outside a run's gate, if any.
        self.first: int | None = None
        self._raising = True  # start-up: a signal raises Stopped
        self._token: Any = None  # the run's TrioToken while it runs
        self._previous: dict[int, Any] = {}
        self._status: int | None = None  # the command's exit status, once it is done

    def install(self) -> bool:
        """Handle the two signals from now on (main thread only: else nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.SIGNALS:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # ignored by whoever started us (nohup, a background job): kept
            found = signal.signal(signum, self._handle)
            # The handler of the package's imports (pipeflow/_cli_start.py) is done with.
            self._previous[signum] = _cli_start.original(signum, found)
        return True

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def restore(self) -> None:
        """Put back the handlers found by :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def hold(self) -> None:
        """From now on a signal is noted (and handed to a starting run), not raised."""
        self._raising = False

    def connect(self, token: Any) -> None:
        """Inside the run's ``trio.run``: a signal is handed over through ``token``."""
        self._token = token

    def disconnect(self) -> None:
        self._token = None

    def exiting(self, status: int) -> None:
        """The command is done and the process exits with ``status``: a signal now ends
        it at once, with that status (128 + N if it was 0). (The interpreter's own exit,
        its atexit callbacks and module teardown, takes a while; Python's default
        handling there is a death by the signal, or a traceback.)"""
        self._status = status

    def ignore(self) -> None:
        """Ignore the two signals from now on, if this is still their handler: the last
        of the exit's atexit callbacks (after it the interpreter puts back the default
        handlers, except an ignored signal's, and tears its modules down)."""
        if self._status is not None and self.installed:
            for signum in self.SIGNALS:
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum: int, frame: object) -> None:
        # Runs in the main thread between two bytecodes, wherever it happens to be.
        if self._status is not None:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(self._status or 128 + signum)
        if self.first is None:
            self.first = signum
        if self._raising:
            self._raising = False  # one Stopped: a signal while it unwinds is noted
            raise Stopped(signum)
        token = self._token
        if token is not None:
            # The one Trio call that is safe in a signal handler (RuntimeError: the run
            # has just finished, nothing is left to stop).
            with contextlib.suppress(RuntimeError):
                token.run_sync_soon(self._forward, signum)

    def _forward(self, signum: int) -> None:
        # In the run's event loop, an instant after the signal. If the run's gate is
        # installed by now, the signal came as the run was starting: it is the gate's
        # (the run stops as for any signal). Otherwise the run has not started (the
        # command checks ``first`` before starting it) or has ended: noted only.
        handler = signal.getsignal(signum)
        if callable(handler) and handler not in (self._handle, signal.default_int_handler):
            handler(signum, None)
