"""The ``pipeflow`` command: ``run``, ``graph``, ``size``, ``plugins`` and ``demo``.

One module per command (``run.py``, ``graph.py``, ``size.py``, ``plugins.py``,
``demo.py``); ``main.py`` holds the parser, ``args.py`` the number parsers,
``errors.py`` the one-line errors, ``signals.py`` SIGINT and SIGTERM outside a run (and
``pipeflow/_cli_start.py`` during the package's imports), ``progress.py`` and
``summary.py`` what ``run`` and ``demo`` share.

Exit statuses: 0 success; 1 the run failed (or items failed under ``errors="collect"``);
2 bad input (an unknown module, a file that cannot be read, a bad number, an unreachable
URL): one line on stderr, ``pipeflow: error: ...``, never a traceback; 128 + the signal
number (130 for SIGINT, 143 for SIGTERM) for a run stopped by a signal after draining,
or a command stopped by one while it starts (one line, never a traceback).
"""

from .main import main as main

__all__ = ["main"]
