"""SIGINT and SIGTERM while the ``pipeflow`` command imports the package.

The command (``python -m pipeflow`` or the ``pipeflow`` script) handles the two signals
from its ``main()`` on (``pipeflow/_cli/signals.py``), but the package's own imports
come first and are most of its start-up (a second or more on a loaded machine): a
signal then was a ``KeyboardInterrupt`` traceback, or a silent death by SIGTERM.

Imported first by ``pipeflow/__init__.py``. Only when this process is the command (and
for a signal whose handler is Python's default) it installs a handler that prints one line and exits
128 + the signal number (nothing has started: there is nothing to clean up). It stays
until the command's ``main()`` installs its own. In any other program nothing changes.
Standard library only, on purpose.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_previous: dict[int, Any] = {}


def _is_the_command() -> bool:
    argv: list[str] = list(getattr(sys, "orig_argv", ()))
    # python [options] -m pipeflow ...
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) == "pipeflow"
        if arg.startswith("-m"):
            return arg == "-mpipeflow"
        if arg in ("-X", "-W"):
            next(args, None)  # an option with a value
        elif arg == "-c" or arg == "-" or not arg.startswith("-"):
            break
    # The ``pipeflow`` script that installing the package writes (its console-script
    # entry point): a few lines that import pipeflow._cli and call its main().
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or os.path.basename(path) not in ("pipeflow", "pipeflow-script.py"):
        return False
    try:
        with open(path, encoding="utf-8") as script:
            return "pipeflow._cli" in script.read(4096)
    except (OSError, ValueError):
        return False


def _stop(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"pipeflow: stopped by {name} while starting\n".encode())
    os._exit(128 + signum)


def original(signum: int, handler: Any) -> Any:
    """``handler`` (the handler of ``signum`` found by the command's main()), or the one
    this module replaced if it is this module's."""
    return _previous.get(signum, handler) if handler is _stop else handler


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    # A signal someone else handles, or ignores (nohup, a background job), is left alone.
    mine = [s for s in _SIGNALS if signal.getsignal(s) == defaults[s]]
    if mine and _is_the_command():
        for signum in mine:
            _previous[signum] = signal.signal(signum, _stop)


_install()
