"""``pipeflow demo``: the web scraper example on a local site, with the live view."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .._pipeline import Pipeline, RunResult
from .._report import Series, build_report, describe_pipeline
from .errors import EXIT_OK, CliError
from .progress import LogHandler, Progress
from .summary import summary


def _demo_script() -> Path:
    """examples/scraper.py of the source checkout pipeflow is installed from."""
    path = Path(__file__).resolve().parents[2] / "examples" / "scraper.py"
    if not path.is_file():
        raise CliError(
            "pipeflow demo runs examples/scraper.py from a source checkout, and none is "
            "next to this installation (clone the repository and pip install -e '.[http]')"
        )
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    """The first thing a newcomer runs: the Go worker-pool guide's web scraper, on a
    local site."""
    path = _demo_script()
    spec = importlib.util.spec_from_file_location("pipeflow_demo_scraper", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise CliError(
            f"pipeflow demo needs {exc.name or 'an optional dependency'}: pip install -e '.[http]'"
        ) from None
    mode = "live" if sys.stdout.isatty() else "lines"
    progress = Progress(sys.stdout, mode=mode, title="pipeflow demo: web scraper")
    series = Series(interval=1.0)
    cpu = [time.process_time()]

    async def watch(pipeline: Pipeline[Any, Any]) -> None:
        t0 = trio.current_time()
        cpu[0] = time.process_time()
        next_sample = 1.0
        k = 0
        try:
            while True:
                k += 1
                await trio.sleep_until(t0 + k * 0.25)
                stats = pipeline.current_stats()
                if stats is None:
                    continue
                t = trio.current_time() - t0
                if t >= next_sample - 1e-9:
                    series.sample(t, stats, time.process_time() - cpu[0])
                    next_sample += 1.0
                progress.update(t, stats, series, pipeline.current_workers())
        finally:
            progress.close()

    def show(result: RunResult[Any], pipeline: Pipeline[Any, Any]) -> None:
        # The same summary as pipeflow run's, from the same kind of report.
        last = series.t[-1] if series.t else 0.0
        series.sample(max(result.elapsed, last), result.stats, time.process_time() - cpu[0])
        report = build_report(
            target="examples/scraper.py:pipeline",
            status="completed",
            result=result.to_dict(),
            structure=describe_pipeline(pipeline),
            series=series,
            stalls=progress.stalls(),
        )
        print(summary(report))
        if result.errors:
            print(f"{len(result.errors)} failed:")
            for err in result.errors:
                cause = err.__cause__
                print(f"  {err.item}: {type(cause).__name__}: {cause}")

    # pipeflow's warnings (the site's 404 and 500 pages) print above the live view.
    logger = logging.getLogger("pipeflow")
    handler = LogHandler(progress)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        module.main(["--pages", str(args.pages)], watch=watch, report=show)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return EXIT_OK
