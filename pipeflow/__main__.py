"""``python -m pipeflow``: the ``pipeflow`` command (see ``pipeflow --help``)."""

import sys

from ._cli import main

# The guard matters: process workers started with "spawn" import the main module again.
if __name__ == "__main__":
    sys.exit(main())
