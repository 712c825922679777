"""Bad input on the command line: one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """Bad input: printed as one line, ``pipeflow: error: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints a usage block and exits; the CLI's contract is one line and
    # exit status 2, raised so that main() is testable without catching SystemExit.
    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("pipeflow").strip()
        hint = f" (see pipeflow {where} --help)" if where else " (see pipeflow --help)"
        raise CliError(f"{where + ': ' if where else ''}{message}{hint}")


def one_line(text: str) -> str:
    return " ".join(text.split())


def error(message: str) -> None:
    print(f"pipeflow: error: {one_line(message)}", file=sys.stderr, flush=True)
