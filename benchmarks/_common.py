"""What every benchmark shares: the hand-written baseline, interleaved timing, the result
rows, the table and the JSON report.

Machines that run benchmarks are shared and noisy, so no figure here is an absolute
claim: each benchmark times pipeflow and its hand-written twin in alternating rounds of
the same process and reports the median of each and their ratio (or, where the two ran
next to each other in every round, the median of the rounds' own ratios).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

import pipeflow
from pipeflow._run import run as _run

ROOT = Path(__file__).resolve().parent.parent

Work = Callable[[Any], Awaitable[Any]]


# -- the hand-written baseline ---------------------------------------------------------------


async def handwritten(source: Any, fn: Work, *, stages: int, workers: int, buffer: int) -> None:
    """The pipeline a careful Trio programmer writes by hand, in pipeflow's shape.

    One memory channel per edge (``buffer`` slots each, pipeflow's default being one per
    worker), ``workers`` tasks per stage each holding its own ``clone()`` of both
    channels inside ``async with`` (the trio docs' channels-mpmc-fixed pattern), the last
    stage's workers dropping their results, and a producer feeding ``source`` into the
    first channel.
    """

    async def producer(send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            for x in source:
                await send.send(x)

    async def worker(
        recv: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any]
    ) -> None:
        async with recv, send:
            async for x in recv:
                await send.send(await fn(x))

    async def last_worker(recv: trio.MemoryReceiveChannel[Any]) -> None:
        async with recv:
            async for x in recv:
                await fn(x)

    async with trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[Any](buffer)
        nursery.start_soon(producer, send)
        for i in range(stages):
            if i + 1 < stages:
                next_send, next_recv = trio.open_memory_channel[Any](buffer)
                async with recv, next_send:
                    for _ in range(workers):
                        nursery.start_soon(worker, recv.clone(), next_send.clone())
                recv = next_recv
            else:
                async with recv:
                    for _ in range(workers):
                        nursery.start_soon(last_worker, recv.clone())


# -- timing ------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    cases: Mapping[str, Callable[[], Any]],
    rounds: int,
    measure: Callable[[Callable[[], Any]], float] = timed,
) -> dict[str, list[float]]:
    """Time each case ``rounds`` times, alternating between cases (and flipping the
    order every round) so that a noisy neighbour hurts every case alike. ``measure``:
    what one call gives (by default its wall-clock seconds; a case that measures itself,
    as ``latency_cpu.py``'s do, is called and its result kept)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            times[name].append(measure(cases[name]))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed_clocks(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (``time.process_time()``: every thread of the process)
    of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved_clocks(
    cases: Mapping[str, Callable[[], object]], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """As :func:`interleaved`, timing each call on both clocks: ``{case: {"wall": [...],
    "cpu": [...]}}``. CPU time is the fair clock for a single-threaded workload on a
    shared machine: a neighbour's load slows the wall clock, not the CPU seconds spent."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in cases}
    order = list(cases)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            wall, cpu = timed_clocks(cases[name])
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """An interval for the median of the distribution ``values`` came from, assuming
    nothing about its shape: the order statistics ``x(k)`` and ``x(n + 1 - k)`` with the
    largest ``k`` whose coverage (the chance that the median lies between them, a
    binomial sum) is still at least ``confidence``. Returns ``(low, high, coverage)``;
    with too few values for ``confidence`` (5 or fewer for 95%), the whole range and
    the coverage it has."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        raise ValueError("no values")

    def coverage(k: int) -> float:  # P(k <= B <= n - k), B ~ Binomial(n, 1/2)
        return sum(math.comb(n, i) for i in range(k, n - k + 1)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1
    return ordered[rank]


# -- a clock that skips idle time -------------------------------------------------------------


class SkipIdleClock(trio.abc.Clock):
    """Time stands still while tasks run; when all wait, it jumps to the first whole
    millisecond (from now) at or past the next deadline, and the wait takes no time."""

    def __init__(self) -> None:
        self._now = 0.0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if deadline == math.inf:
            return 86_400.0  # nothing is due: a real wait (for a thread, say)
        if deadline > self._now:
            whole_ms = math.ceil((deadline - self._now) * 1000 - 1e-9) / 1000
            self._now = max(deadline, self._now + whole_ms)
        return 0.0


@contextlib.contextmanager
def source_always_waited() -> Iterator[None]:
    """Inside, pipeflow's source task takes every item as one the source made it wait for
    (``run.SOURCE_WAITED`` below zero); put back as it was on the way out, raised or not.

    On :class:`SkipIdleClock`, which stands still while tasks run, the source's task
    would never see that the source made it wait for an item (``SOURCE_WAITED``, 20 us)
    except across an idle jump; on the real clock at the latency benchmark's rate it does
    for nearly every item (a round takes longer), and then steps aside to let the worker
    it woke start first. This does what the real clock does."""
    source_waited = _run.SOURCE_WAITED
    _run.SOURCE_WAITED = -1.0
    try:
        yield
    finally:
        _run.SOURCE_WAITED = source_waited


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the report.

    ``pipeflow`` and ``baseline`` are the two figures compared (items/s, MB, ...), with
    ``baseline_label`` saying what the baseline is when it is not the hand-written
    pipeline. ``ratio`` is ``pipeflow / baseline`` for rates, and for the memory row the
    growth in MB. ``target`` is a comparison such as ``(">=", 0.8)``; None means the row
    is information, not a check.
    """

    benchmark: str
    workload: str
    unit: str
    pipeflow: float
    baseline: float | None
    ratio: float
    target: tuple[str, float] | None = None
    baseline_label: str = "hand-written"
    #: Shown after the figures in the table, e.g. the peak RSS behind a growth.
    pipeflow_note: str = ""
    baseline_note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        op, value = self.target
        return self.ratio >= value if op == ">=" else self.ratio <= value

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def paired_ratio(pipeflow: Sequence[float], baseline: Sequence[float]) -> float:
    """The median of the rounds' own ratios ``baseline[i] / pipeflow[i]`` (for times:
    pipeflow's speed relative to the baseline's in round ``i``).

    The machine's speed drifts by a third or more over seconds; two runs next to each
    other in one round see nearly the same machine, so their ratio keeps little of the
    drift, where the ratio of each side's median compares runs seconds apart."""
    if len(pipeflow) != len(baseline) or not pipeflow:
        raise ValueError("paired rounds need as many times on each side")
    return median([b / p for p, b in zip(pipeflow, baseline, strict=True)])


def rate_row(
    benchmark: str,
    workload: str,
    items: int,
    pipeflow_times: Sequence[float],
    baseline_times: Sequence[float],
    *,
    target: tuple[str, float] | None,
    baseline_label: str = "hand-written",
    detail: dict[str, Any] | None = None,
    paired: bool = False,
) -> Row:
    """A throughput comparison from the rounds' times: each side's rate is the median of
    its rounds; the ratio is the ratio of those, or with ``paired`` (the two sides ran
    next to each other in every round) the median of the rounds' own ratios
    (:func:`paired_ratio`)."""
    pf = items / median(pipeflow_times)
    base = items / median(baseline_times)
    info = {
        "items": items,
        "pipeflow_seconds": list(pipeflow_times),
        "baseline_seconds": list(baseline_times),
    }
    if paired:
        info["ratio_of_medians"] = pf / base
        info["paired_ratios"] = [b / p for p, b in zip(pipeflow_times, baseline_times, strict=True)]
    info.update(detail or {})
    return Row(
        benchmark=benchmark,
        workload=workload,
        unit="items/s",
        pipeflow=pf,
        baseline=base,
        ratio=paired_ratio(pipeflow_times, baseline_times) if paired else pf / base,
        target=target,
        baseline_label=baseline_label,
        detail=info,
    )


def _fmt(value: float | None, unit: str, note: str = "") -> str:
    if value is None:
        return "-"
    if unit == "items/s":
        text = f"{value:,.0f}/s" if value >= 100 else f"{value:,.1f}/s"
    elif unit == "ms":  # a latency, not a growth
        text = f"{value:,.3f} ms"
    else:
        text = f"{value:+,.1f} {unit}"
    return f"{text} {note}" if note else text


def format_table(rows: Sequence[Row]) -> str:
    """The report as an aligned text table."""
    header = ("workload", "pipeflow", "hand-written", "ratio", "target", "result")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        base = _fmt(row.baseline, row.unit, row.baseline_note)
        if row.baseline_label != "hand-written" and row.baseline is not None:
            base = f"{row.baseline_label}: {base}"
        # A memory row checks its growth (the pipeflow figure); there is no ratio. Nor
        # where the baseline measured nothing (NaN).
        ratio = "-" if row.unit == "MB" or math.isnan(row.ratio) else f"{row.ratio:.2f}"
        if row.target is None:
            target, result = "-", "info"
        else:
            op, value = row.target
            target = f"{op} {value:g}" + (" MB" if row.unit == "MB" else "")
            result = "PASS" if row.passed else "FAIL"
        pf = _fmt(row.pipeflow, row.unit, row.pipeflow_note)
        lines.append((row.workload, pf, base, ratio, target, result))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(w) if i in (0, 2) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where and when the figures were measured."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "trio": trio.__version__,
        "pipeflow": pipeflow.__version__,
        "platform": platform.platform(),
        # The machine is shared: other load competes for the same cores.
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
    }


def report(
    rows: Sequence[Row],
    *,
    quick: bool,
    json_path: str | None,
    errors: dict[str, str] | None = None,
) -> None:
    """Print the table (and where it was measured); write JSON if asked. ``errors``
    maps a benchmark that could not run to its traceback."""
    info = machine_info()
    print(
        f"\n{info['date']}  {info['cpu']} ({info['cores']} cores)  "
        f"Python {info['python']}  Trio {info['trio']}  pipeflow {info['pipeflow']}  "
        f"load {info['loadavg_1min']:.2f}"
        + ("  [--quick: short runs, figures are indicative only]" if quick else "")
    )
    print(format_table(rows))
    cores = info["cores"] or 1
    if info["loadavg_1min"] > cores:
        print(
            f"note: load average {info['loadavg_1min']:.1f} on {cores} cores: other work "
            f"competes for the CPU; ratios of CPU-bound runs (process workers) suffer most"
        )
    for name, trace in (errors or {}).items():
        last = trace.strip().splitlines()[-1]
        print(f"ERROR {name}: {last} (traceback on stderr)")
    if json_path:
        data = {
            "machine": info,
            "quick": quick,
            "rows": [r.to_dict() for r in rows],
            "errors": errors or {},
        }
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {json_path}")


def progress(message: str) -> None:
    """A line on stderr while a long benchmark runs (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def parse_args(
    description: str, argv: Sequence[str] | None = None, parts: Sequence[str] = ()
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if a target is missed"
    )
    if parts:
        parser.add_argument(
            "--only",
            metavar="PART[,PART]",
            type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
            help=f"measure only these workloads, of: {', '.join(parts)}",
        )
        parser.add_argument(
            "--rounds", type=int, metavar="N", help="interleaved rounds per workload"
        )
    args = parser.parse_args(argv)
    if parts:
        unknown = [p for p in args.only or () if p not in parts]
        if unknown or args.only == []:
            parser.error(f"--only takes workloads of: {', '.join(parts)} (got {unknown})")
        if args.rounds is not None and args.rounds < 1:
            parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    return args


def exit_code(rows: Sequence[Row], *, check: bool) -> int:
    """1 if ``check`` and a target is missed (for CI that wants a gate), else 0."""
    return 1 if check and any(r.passed is False for r in rows) else 0


def bench_main(
    doc: str | None,
    measure: Callable[..., list[Row]],
    quick: dict[str, Any],
    argv: Sequence[str] | None = None,
    parts: Sequence[str] = (),
) -> int:
    """The command line of one benchmark: ``[--quick] [--json FILE] [--check]``, and
    for one made of ``parts`` (workloads), ``[--only PART[,PART]] [--rounds N]``."""
    args = parse_args((doc or "").strip().splitlines()[0], argv, parts)
    kwargs = dict(quick) if args.quick else {}
    if parts:
        if args.only:
            kwargs["only"] = args.only
        if args.rounds is not None:
            kwargs["rounds"] = args.rounds
    rows = measure(**kwargs)
    report(rows, quick=args.quick, json_path=args.json)
    return exit_code(rows, check=args.check)


def callgrind_instructions(script: str | Path, *args: str) -> int:
    """Machine instructions (valgrind's callgrind) of a whole ``python script *args``
    process: what the shared machine's noise cannot move."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(Path(script).resolve()),
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{done.stderr}")
    return int(found.group(1))


def callgrind_per_item(
    script: str | Path, flag: str, sides: Sequence[str], small: int, large: int, *, label: str
) -> dict[str, float]:
    """Machine instructions per item on each of ``sides``, each a child process
    ``python script flag side N`` under callgrind: ``(Ir(large) - Ir(small)) / (large -
    small)``, so that start-up and the end do not count."""
    if shutil.which("valgrind") is None:
        raise SystemExit(f"{label} needs valgrind (apt-get install valgrind)")
    per_item = {}
    # The two sizes side by side (callgrind runs one core each; they do not share counts).
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for side in sides:
            progress(f"{label}: {side}, {small:,} and {large:,} items")
            big, little = pool.map(
                lambda n, side=side: callgrind_instructions(script, flag, side, str(n)),
                (large, small),
            )
            per_item[side] = (big - little) / (large - small)
    return per_item
