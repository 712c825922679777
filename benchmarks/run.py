"""Run every benchmark in one process and print one table (``--json FILE`` for a report).

    python benchmarks/run.py            # the full run (a few minutes)
    python benchmarks/run.py --quick    # a short smoke run (about half a minute)
    python benchmarks/run.py overhead io --json results.json

Each benchmark also runs on its own: ``python benchmarks/bench_overhead.py``, and so
on. Any other ``benchmarks/bench_NAME.py`` that defines ``measure()`` and ``QUICK`` (the
same interface) runs too, after these, as ``NAME``. A benchmark that fails to run is
reported with its traceback; the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_io, bench_memory, bench_overhead, bench_process, bench_stream
from benchmarks._common import Row, exit_code, progress, report

BENCHMARKS: dict[str, ModuleType] = {
    "overhead": bench_overhead,
    "io": bench_io,
    "memory": bench_memory,
    "process": bench_process,
    "stream": bench_stream,
}

#: Benchmarks found but not importable (a missing extra, say): name -> traceback.
UNLOADABLE: dict[str, str] = {}


def _discover() -> None:
    """Add the other ``bench_*.py`` modules that follow the interface."""
    for path in sorted(Path(__file__).resolve().parent.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if name in BENCHMARKS:
            continue
        try:
            module = importlib.import_module(f"benchmarks.{path.stem}")
        except Exception:
            UNLOADABLE[name] = traceback.format_exc()
            continue
        if callable(getattr(module, "measure", None)) and hasattr(module, "QUICK"):
            BENCHMARKS[name] = module


_discover()


def run(names: list[str], *, quick: bool) -> tuple[list[Row], dict[str, str]]:
    """The rows of the named benchmarks, and the traceback of each that failed."""
    rows: list[Row] = []
    errors: dict[str, str] = {}
    for name in names:
        if name in UNLOADABLE:
            errors[name] = UNLOADABLE[name]
            continue
        module = BENCHMARKS[name]
        try:
            rows.extend(module.measure(**module.QUICK) if quick else module.measure())
        except Exception:
            errors[name] = traceback.format_exc()
            progress(f"benchmark {name} failed:\n{errors[name]}")
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run: {', '.join([*BENCHMARKS, *UNLOADABLE])}",
    )
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if a target is missed"
    )
    args = parser.parse_args(argv)
    known = [*BENCHMARKS, *UNLOADABLE]
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {known}")
    rows, errors = run(args.names or known, quick=args.quick)
    report(rows, quick=args.quick, json_path=args.json, errors=errors)
    return 1 if errors else exit_code(rows, check=args.check)


if __name__ == "__main__":
    sys.exit(main())
